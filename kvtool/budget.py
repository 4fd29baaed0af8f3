"""Weights against KV-cache memory from a model's config alone: ``kvtool budget``.

What it reads: a config (``config.json``, a model folder, a ``.gguf`` file's metadata, the bundled model's
config, or a preset from :mod:`kvtool.budget_presets`). No weight is loaded: the parameter count comes from
a weightless (meta-device) instance of the transformers model built from the config, or, for a model type
transformers does not know, from the standard gated-decoder formula.

What it computes, per context length ``T`` and batch ``B``:

* weights: ``parameters × bits / 8`` for each weight width asked for (all parameters at that width; the
  non-embedding count is reported beside it);
* the KV cache per codec spec, from bytes the codec *really stores*: a tensor of the model's geometry
  ``(kv_heads, T, head_dim)`` is encoded and every stored array counted (codes, scales, norms, fp16 windows),
  plus the codec's per-layer shared state once. Stored bytes are not a constant rate: a fp16 window (KIVI's
  residual, TurboQuant's sink) is all of a short cache and little of a long one. :class:`StoredBytes` encodes
  exactly for short contexts and, past the point where three measurements show the growth is affine in
  tokens (every window is full), extrapolates that line — exact for every codec whose storage is
  windows + a per-token rate;
* layer geometry: sliding-window layers hold at most their window, chunked-attention layers their chunk,
  linear-attention/SSM layers no growing cache; GQA and MQA by their KV-head count; MLA (DeepSeek) caches one
  latent per token, ``kv_lora_rank`` (coded as values) plus ``qk_rope_head_dim`` (coded as keys);
* the context at which ``B`` sequences' KV cache outgrows the weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtool.budget_presets import PRESETS
from kvtool.codecs import LayerContext, parse_spec
from kvtool.errors import CodecError, InputError, ModelError
from kvtool.models import bundled_model_path, converted_path, hub_config, looks_like_hub_id
from kvtool.report import header, json_safe
from kvtool.store import file_sha256
from kvtool.util import atomic_write

GIB = 1024**3
DEFAULT_CONTEXTS = "4k,32k,128k"
DEFAULT_BATCHES = "1"
DEFAULT_WEIGHT_BITS = "16,8,4,1.58,1.125"
DEFAULT_KV = ("fp16", "fp8", "kivi:bits=4", "kivi:bits=2", "turboquant:bits=3")
MAX_SEARCH_TOKENS = 2**40

# Layer types (transformers' ``layer_types``) whose cache does not grow with the context.
_NO_KV_TYPES = re.compile(r"linear|mamba|ssm|conv|recurrent|rwkv", re.I)


# ------------------------------------------------------------------------------------------ the config


@dataclass(frozen=True)
class TensorShape:
    """One cached tensor per layer and token: ``heads × dim`` elements, coded with the codec's ``role``."""

    name: str
    role: str
    heads: int
    dim: int


@dataclass
class Geometry:
    """What sets a model's memory: its cached tensors, which layers cap them, and its parameter count."""

    model: str
    source: str
    architecture: str
    model_type: str
    num_layers: int
    num_q_heads: int
    tensors: tuple[TensorShape, ...]
    #: per layer: None = grows with the context, n > 0 = holds at most n tokens, 0 = no KV cache
    layer_caps: tuple[int | None, ...]
    max_context: int | None
    parameters: int
    parameters_non_embedding: int
    parameters_method: str
    notes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        caps = Counter(self.layer_caps)
        return {"num_layers": self.num_layers, "num_q_heads": self.num_q_heads,
                "tensors": [vars(t) for t in self.tensors],
                "layers_full": caps.get(None, 0), "layers_without_kv": caps.get(0, 0),
                "layers_capped": {str(c): n for c, n in sorted((c, n) for c, n in caps.items() if c)},
                "max_context": self.max_context, "parameters": self.parameters,
                "parameters_non_embedding": self.parameters_non_embedding,
                "parameters_method": self.parameters_method}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the config ({getattr(exc, 'strerror', None) or exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not a JSON config ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config must be a JSON object, got {type(data).__name__}")
    return data


def _gguf_config(path: Path) -> dict[str, Any]:
    """The transformers config a GGUF file's metadata describes (the gguf package reads the header only)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except Exception as exc:  # the gguf reader raises many types for a bad file
        detail = " ".join(str(exc).split())
        raise InputError(f"{path}: cannot read GGUF metadata ({type(exc).__name__}: {detail})") from None
    return dict(config)


def read_config(model: str, *, trust_remote_code: bool = False) -> tuple[dict[str, Any], str, list[str]]:
    """``(config dict, model_source, sources)`` for a ``--model`` value: ``default``, a preset name, a
    ``.gguf`` file, a folder holding ``config.json``, a ``config.json`` file, or a hub id (its config only:
    the local Hugging Face cache first, the hub when reachable, as ``capture`` and ``eval`` find it)."""
    key = model.strip().lower()
    if key in PRESETS:
        preset = PRESETS[key]
        return dict(preset["config"]), f"preset:{key}", [preset["title"], *preset["sources"]]
    if model == "default":
        gguf = bundled_model_path()
        digest = file_sha256(gguf)
        converted = converted_path(digest) / "config.json"
        if converted.is_file():
            with contextlib.suppress(InputError):
                return _read_json(converted), f"sha256:{digest}", [f"config of the converted copy {converted}"]
        return _gguf_config(gguf), f"sha256:{digest}", [f"GGUF metadata of {gguf}"]
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise InputError(f"{model}: no such GGUF file")
        return _gguf_config(path), f"sha256:{file_sha256(path)}", [f"GGUF metadata of {path}"]
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{model}: the folder has no config.json")
        return _read_json(path / "config.json"), "", [f"{path / 'config.json'}"]
    if path.is_file():
        return _read_json(path), "", [str(path)]
    hub = ""
    if looks_like_hub_id(model):
        try:
            config, revision = hub_config(model, trust_remote_code=trust_remote_code)
        except ModelError as exc:
            hub = f" ({str(exc).removeprefix(f'unknown model {model!r}: ')})"
        else:
            return config, revision, [f"config of {model} (Hugging Face hub{', ' + revision if revision else ''})"]
    raise InputError(f"{model}: not a preset, a .gguf file, a folder with config.json, a config file or a hub "
                     f"id{hub}; presets: {', '.join(PRESETS)}; or 'default' (the bundled SmolLM2)")


def _config_object(cfg: dict[str, Any]) -> tuple[Any, bool]:
    """A transformers config for ``cfg`` (``known``: transformers has this model type), else a generic one."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    fields_ = {k: v for k, v in cfg.items() if k != "model_type"}
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    try:
        return (CONFIG_MAPPING[model_type](**fields_) if known else PretrainedConfig(**fields_)), known
    except Exception as exc:  # transformers validates fields with several exception types
        detail = " ".join(str(exc).split())  # one line, whatever transformers formats
        raise InputError(f"invalid {model_type or 'model'} config: {detail}") from None


def _attr(c: Any, *names: str) -> Any:
    for name in names:
        value = getattr(c, name, None)
        if value is not None:
            return value
    return None


def _int_attr(c: Any, what: str, *names: str) -> int:
    value = _attr(c, *names)
    if value is None:
        raise InputError(f"the config has no {what} ({' / '.join(names)})")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"the config's {names[0]} must be an integer, got {value!r}") from None
    if number < 1:
        raise InputError(f"the config's {names[0]} must be >= 1, got {number}")
    return number


def _layer_caps(c: Any, n_layers: int, notes: list[str]) -> tuple[int | None, ...]:
    window = int(_attr(c, "sliding_window") or 0)
    chunk = int(_attr(c, "attention_chunk_size") or 0)
    types = _attr(c, "layer_types")
    if not types:
        # No per-layer types: a sliding window then applies to every layer (Mistral 7B v0.1, Phi-3), unless
        # the config switches it off (Qwen2's use_sliding_window=false).
        sliding = window > 0 and _attr(c, "use_sliding_window") is not False
        types = ["sliding_attention" if sliding else "full_attention"] * n_layers
    if len(types) != n_layers:
        raise InputError(f"the config's layer_types lists {len(types)} layers, num_hidden_layers says {n_layers}")
    caps: list[int | None] = []
    for t in map(str, types):
        if _NO_KV_TYPES.search(t):
            caps.append(0)
        elif "sliding" in t and window:
            caps.append(window)
        elif "chunk" in t and chunk:
            caps.append(chunk)
        else:
            caps.append(None)
    if caps.count(0):
        notes.append(f"{caps.count(0)} layers ({sorted({t for t in map(str, types) if _NO_KV_TYPES.search(t)})}) "
                     "keep a fixed-size state, not a growing KV cache; not counted")
    return tuple(caps)


def _tensors(c: Any, n_q: int, notes: list[str]) -> tuple[TensorShape, ...]:
    rank = _attr(c, "kv_lora_rank")
    if rank:
        rope = int(_attr(c, "qk_rope_head_dim") or 0)
        nope = int(_attr(c, "qk_nope_head_dim") or 0)
        v_dim = int(_attr(c, "v_head_dim") or 0)
        notes.append(f"MLA: one latent per token and layer, kv_lora_rank {rank} + rope {rope} "
                     "(as MLA-aware engines cache it); transformers' own implementation caches expanded keys "
                     f"and values instead, {n_q} heads × ({nope + rope} + {v_dim}) per token")
        shapes = [TensorShape("latent", "values", 1, int(rank))]
        if rope:
            shapes.append(TensorShape("rope_keys", "keys", 1, rope))
        return tuple(shapes)
    n_kv = int(_attr(c, "num_key_value_heads", "num_kv_heads", "n_head_kv") or n_q)
    if _attr(c, "multi_query") and not _attr(c, "new_decoder_architecture"):
        n_kv = 1  # Falcon-7B style MQA
    hidden = _attr(c, "hidden_size", "n_embd", "d_model")
    head_dim = _attr(c, "head_dim") or (int(hidden) // n_q if hidden else None)
    if not head_dim:
        raise InputError("the config has neither head_dim nor hidden_size to derive it from")
    v_dim = int(_attr(c, "v_head_dim") or head_dim)
    return (TensorShape("keys", "keys", n_kv, int(head_dim)), TensorShape("values", "values", n_kv, v_dim))


def count_parameters(config: Any, known: bool) -> tuple[int, int, str]:
    """``(parameters, non-embedding parameters, how)`` from a config, without weights."""
    if known:
        try:
            import torch
            from transformers import AutoModelForCausalLM

            # modeling modules may warn about their own deprecated torch APIs on import: not the user's concern
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                model = AutoModelForCausalLM.from_config(config)
            total = sum(p.numel() for p in model.parameters())
            inp, out = model.get_input_embeddings(), model.get_output_embeddings()
            embedding = inp.weight.numel() if inp is not None else 0
            if out is not None and (inp is None or out.weight is not inp.weight):
                embedding += out.weight.numel()
            return int(total), int(total - embedding), "counted on a weightless (meta-device) transformers model"
        except Exception as exc:  # a config transformers accepts but cannot build: use the formula
            how = f"standard gated-decoder formula (transformers could not build it: {type(exc).__name__})"
    else:
        how = "standard gated-decoder formula (model type unknown to transformers)"
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = _int_attr(c, "vocab size", "vocab_size")
    hidden = _int_attr(c, "hidden size", "hidden_size", "n_embd", "d_model")
    layers = _int_attr(c, "layer count", "num_hidden_layers", "n_layer", "num_layers")
    n_q = _int_attr(c, "attention heads", "num_attention_heads", "n_head")
    n_kv = int(_attr(c, "num_key_value_heads") or n_q)
    head_dim = int(_attr(c, "head_dim") or hidden // n_q)
    ffn = int(_attr(c, "intermediate_size", "n_inner") or 4 * hidden)
    embedding = vocab * hidden * (1 if _attr(c, "tie_word_embeddings") is not False else 2)
    per_layer = hidden * head_dim * (2 * n_q + 2 * n_kv) + 3 * hidden * ffn + 2 * hidden
    body = layers * per_layer + hidden
    return embedding + body, body, how


_REQUIRED = (("layer count", ("num_hidden_layers", "n_layer", "num_layers")),
             ("attention heads", ("num_attention_heads", "n_head")),
             ("hidden size", ("hidden_size", "n_embd", "d_model")))


def _require_geometry(cfg: dict[str, Any]) -> None:
    """transformers fills absent fields with a default model's values; a budget from those would describe
    another model, so the geometry must be stated in the config itself."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for what, names in _REQUIRED:
        if not any(cfg.get(n) is not None or text.get(n) is not None for n in names):
            raise InputError(f"the config has no {what} ({' / '.join(names)}); give the model's own config.json")


def load_geometry(model: str = "default", *, trust_remote_code: bool = False) -> Geometry:
    """Read ``model``'s config (see :func:`read_config`) and derive its cache geometry and parameter count."""
    cfg, source, sources = read_config(model, trust_remote_code=trust_remote_code)
    _require_geometry(cfg)
    config, known = _config_object(cfg)
    c = config.get_text_config()
    notes: list[str] = []
    n_layers = _int_attr(c, "layer count", "num_hidden_layers", "n_layer", "num_layers")
    n_q = _int_attr(c, "attention heads", "num_attention_heads", "n_head")
    tensors = _tensors(c, n_q, notes)
    caps = _layer_caps(c, n_layers, notes)
    params, non_embedding, how = count_parameters(config, known)
    max_ctx = _attr(c, "max_position_embeddings", "n_positions", "max_sequence_length")
    arch = (cfg.get("architectures") or [""])[0] if isinstance(cfg.get("architectures"), list) else ""
    return Geometry(model=model, source=source, architecture=str(arch), model_type=str(cfg.get("model_type", "")),
                    num_layers=n_layers, num_q_heads=n_q, tensors=tensors, layer_caps=caps,
                    max_context=int(max_ctx) if max_ctx else None, parameters=params,
                    parameters_non_embedding=non_embedding, parameters_method=how, notes=notes, sources=sources)


# -------------------------------------------------------------------------------------- stored bytes


class StoredBytes:
    """Bytes one codec stores for one layer's tensor ``(heads, tokens, dim)``, as a function of ``tokens``.

    Measured by encoding gaussian tensors (a fixed-rate codec stores the same bytes for any data of a shape):
    exactly up to the point where three measurements at ``a, 2a, 3a`` tokens grow by equal steps (``a`` from
    512, doubled while they do not, up to 8192 — windows longer than that are the only case it would miss),
    then along that line. ``shared`` is the fitted per-layer state, stored once whatever the batch.
    """

    START, LIMIT = 512, 8192

    def __init__(self, spec: str, tensor: TensorShape, seed: int = 0) -> None:
        self.spec, self.tensor, self.seed = spec, tensor, seed
        self._parse = lambda: parse_spec(spec).for_role(tensor.role)
        try:
            self.canonical = self._parse().spec()
            self._parse().validate(tensor.dim)
        except CodecError as exc:
            raise CodecError(f"--kv {spec}: cannot code the {tensor.name} (head_dim {tensor.dim}): {exc}") \
                from None
        self._memo: dict[int, tuple[int, int]] = {0: (0, 0)}
        self.affine = self._find_line()

    def measure(self, tokens: int) -> tuple[int, int]:
        """``(stored bytes, shared-state bytes)`` of really encoding ``tokens`` tokens."""
        if tokens not in self._memo:
            h, d = self.tensor.heads, self.tensor.dim
            rng = np.random.default_rng(self.seed)
            x = rng.standard_normal((h, tokens, d), dtype=np.float32)
            nq = min(tokens, 16)
            # selectors may score tokens with queries: give them some, at the last positions
            ctx = LayerContext(layer=0, role=self.tensor.role,
                               queries=rng.standard_normal((h, nq, d), dtype=np.float32),
                               query_positions=np.arange(tokens - nq, tokens), key_positions=np.arange(tokens),
                               keys=x, scaling=d**-0.5)
            codec = self._parse()
            try:
                codec.fit(x, ctx)
                enc = codec.encode(x)
            except CodecError as exc:
                raise CodecError(f"--kv {self.spec}: cannot code {tokens} tokens of the {self.tensor.name}: "
                                 f"{exc}") from None
            shared = int(sum(a.nbytes for a in codec.shared_state().values()))
            self._memo[tokens] = (enc.nbytes, shared)
        return self._memo[tokens]

    def _find_line(self) -> bool:
        a = self.START
        while True:
            b1, b2, b3 = (self.measure(k * a)[0] for k in (1, 2, 3))
            # a few bytes of packing slack per head are allowed; a window still filling is not
            if abs((b3 - b2) - (b2 - b1)) <= max(8 * self.tensor.heads, 1e-4 * (b3 - b2)):
                self.knee, self.slope = 3 * a, (b3 - b2) / a
                return True
            if 2 * a > self.LIMIT:
                self.knee, self.slope = 3 * a, (b3 - b2) / a
                return False
            a *= 2

    def __call__(self, tokens: int) -> tuple[int, int]:
        if tokens <= self.knee:
            return self.measure(tokens)
        stored, shared = self.measure(self.knee)
        return stored + math.ceil(self.slope * (tokens - self.knee)), shared


@dataclass
class KVCost:
    """The KV cache of one codec spec on one model: ``bytes(tokens, batch)`` and stored bits per element."""

    spec: str
    geometry: Geometry
    parts: dict[str, StoredBytes]

    @classmethod
    def build(cls, spec: str, geometry: Geometry) -> KVCost:
        return cls(spec, geometry, {t.name: StoredBytes(spec, t) for t in geometry.tensors})

    def per_layer_tokens(self, tokens: int) -> Counter:
        return Counter(0 if cap == 0 else tokens if cap is None else min(tokens, cap)
                       for cap in self.geometry.layer_caps)

    def bytes(self, tokens: int, batch: int = 1) -> dict[str, int | float]:
        """Stored bytes of ``batch`` sequences of ``tokens`` tokens (shared state counted once)."""
        stored = shared = elements = 0
        for n_tok, n_layers in self.per_layer_tokens(tokens).items():
            for t in self.geometry.tensors:
                s, sh = self.parts[t.name](n_tok) if n_tok else (0, 0)
                stored += n_layers * s
                shared += n_layers * sh
                elements += n_layers * t.heads * n_tok * t.dim
        return {"bytes": batch * stored + shared, "stored_bytes_per_sequence": stored, "shared_state_bytes": shared,
                "bits_per_element": 8.0 * stored / elements if elements else 0.0,
                "fp16_bytes": batch * 2 * elements}


def first_context_over(fn: Callable[[int], float], limit: float) -> int | None:
    """The smallest token count ``T >= 1`` with ``fn(T) > limit`` for nondecreasing ``fn``; None if even
    2**40 tokens stay within it (every layer capped by a window)."""
    if fn(1) > limit:
        return 1
    lo, hi = 1, 2
    while fn(hi) <= limit:
        if hi >= MAX_SEARCH_TOKENS:
            return None
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fn(lo) <= limit < fn(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fn(mid) <= limit else (lo, mid)
    return hi


# ---------------------------------------------------------------------------------------------- inputs


def parse_tokens(spec: str, what: str = "--context") -> list[int]:
    """``"4k,32k,128k"`` → ``[4096, 32768, 131072]`` (k = 1024, m = 1024²; plain integers too)."""
    out = []
    for part in spec.split(","):
        text = part.strip()
        m = re.fullmatch(r"(-?\d+(?:\.\d+)?)([kKmM]?)", text)
        if not m:
            raise InputError(f"{what} {spec!r}: {text!r} is not a token count (use e.g. 4k,32k,128k or 4096)")
        value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
        if value < 1 or value != int(value):
            raise InputError(f"{what} {spec!r}: {text!r} must be a whole number of tokens >= 1")
        out.append(int(value))
    return out


def parse_batches(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise InputError(f"--batch {spec!r}: {part.strip()!r} is not an integer (use e.g. 1,8)") from None
        if value < 1:
            raise InputError(f"--batch {spec!r}: batch sizes must be >= 1, got {value}")
        out.append(value)
    return out


def parse_bits(spec: str) -> list[float]:
    out = []
    for part in spec.split(","):
        try:
            value = float(part.strip())
        except ValueError:
            raise InputError(f"--weight-bits {spec!r}: {part.strip()!r} is not a number (use e.g. "
                             "16,8,4,1.58,1.125)") from None
        if not 0 < value <= 64:
            raise InputError(f"--weight-bits {spec!r}: bits must be in (0, 64], got {value:g}")
        out.append(value)
    return out


# ------------------------------------------------------------------------------------------ the budget


def budget(model: str = "default", contexts: list[int] | None = None, batches: list[int] | None = None,
           weight_bits: list[float] | None = None, kv_specs: list[str] | None = None,
           plot: Path | str | None = None, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """The ``kvtool budget`` report: weights per bit width, KV cache per codec spec, context and batch, and
    the context where the KV cache outgrows the weights; with ``plot``, also a figure of memory against
    context (see :func:`plot_budget`). The module docstring says what is measured."""
    contexts = contexts or parse_tokens(DEFAULT_CONTEXTS)
    batches = batches or parse_batches(DEFAULT_BATCHES)
    weight_bits = weight_bits or parse_bits(DEFAULT_WEIGHT_BITS)
    kv_specs = list(kv_specs or DEFAULT_KV)
    if plot is not None:
        _plot_path(plot)
    for name, values in (("--context", contexts), ("--batch", batches)):
        if any(v < 1 for v in values):
            raise InputError(f"{name} values must be >= 1, got {min(values)}")
    geo = load_geometry(model, trust_remote_code=trust_remote_code)
    costs = [KVCost.build(s, geo) for s in kv_specs]
    weights = [{"bits": b, "bytes": geo.parameters * b / 8} for b in weight_bits]
    rows = []
    for t in contexts:
        for b in batches:
            rows.append({"context": t, "batch": b,
                         "beyond_max_context": bool(geo.max_context and t > geo.max_context),
                         "kv": [{"spec": c.spec, **c.bytes(t, b)} for c in costs]})
    crossover = []
    for c in costs:
        for b in batches:
            for w in weights:
                t = first_context_over(lambda n, c=c, b=b: c.bytes(n, b)["bytes"], w["bytes"])
                crossover.append({"spec": c.spec, "batch": b, "weight_bits": w["bits"], "context": t,
                                  "beyond_max_context": bool(t and geo.max_context and t > geo.max_context)})
    notes = list(geo.notes)
    notes += [f"{c.spec}: storage not affine in tokens up to {StoredBytes.LIMIT * 3} tokens; extrapolated "
              "from the last measurements" for c in costs if not all(p.affine for p in c.parts.values())]
    codecs = [{"spec": c.spec, **{f"{name}_spec": p.canonical for name, p in c.parts.items()},
               "stored_bits_per_element": {str(t): c.bytes(t)["bits_per_element"] for t in contexts}}
              for c in costs]
    report = {**header("budget", model=model, model_source=geo.source, model_architecture=geo.architecture),
              "model_type": geo.model_type, "geometry": geo.describe(), "sources": geo.sources,
              "weights": weights, "kv_codecs": codecs, "rows": rows, "crossover": crossover, "notes": notes,
              "plot": str(plot) if plot is not None else None}
    if plot is not None:
        plot_budget(report, geo, costs, plot)
    return json_safe(report)


def _plot_path(path: Path | str) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise InputError(f"--plot {path}: give a .png, .svg or .pdf file name")
    return path


def plot_budget(report: dict[str, Any], geometry: Geometry, costs: list[KVCost], path: Path | str,
                points: int = 48) -> Path:
    """A PNG (or any format matplotlib knows from the suffix) of KV memory against context, one panel per
    batch size (up to 4), weights as dashed lines. Written to a temporary file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = _plot_path(path)
    batches = sorted({r["batch"] for r in report["rows"]})[:4]
    top = max([r["context"] for r in report["rows"]] + [geometry.max_context or 0])
    grid = np.unique(np.geomspace(128, max(top, 256), points).astype(int))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], batches, strict=True):
        for c in costs:
            ax.plot(grid, [c.bytes(int(t), b)["bytes"] / GIB for t in grid], label=f"KV {c.spec}")
        for w in report["weights"]:
            ax.axhline(w["bytes"] / GIB, ls="--", lw=0.8, color="grey")
            ax.annotate(f"weights {w['bits']:g} bit", (grid[0], w["bytes"] / GIB), fontsize=7, color="grey",
                        va="bottom")
        if geometry.max_context:
            ax.axvline(geometry.max_context, ls=":", color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("memory (GiB)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{report['model']}: weights vs KV cache (stored bytes per codec)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:  # temp file + rename (util.atomic_write): a full disk or an interruption leaves nothing partial
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt), "the plot")
    finally:
        plt.close(fig)
    return path


__all__ = ["DEFAULT_KV", "Geometry", "KVCost", "StoredBytes", "TensorShape", "budget",
           "count_parameters", "first_context_over", "load_geometry", "parse_batches", "parse_bits",
           "parse_tokens", "plot_budget", "read_config"]

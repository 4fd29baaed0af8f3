"""Run a model over text and record its KV cache (and queries) into a kvtool store.

Keys and values are read from the model's own cache object after one forward pass, so they are
exactly what the cache holds (post-RoPE; only the window for sliding-window layers). Queries never
reach the cache, so they are recorded through transformers' public ``AttentionInterface``
(:func:`kvtool.hooks.recording`): an attention function that notes the post-RoPE query and then calls the
real attention implementation. No model code is forked or patched.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtool.compat import forward_cache_kwarg, grouped_sdpa, output_cache
from kvtool.errors import InputError, KvtoolError, NonFiniteError
from kvtool.hooks import AttentionHook, ProgressFn, Recorder, recording
from kvtool.models import LoadedModel, ModelShape, model_shape
from kvtool.rope import RopeRecorder
from kvtool.store import LAYER_FULL, LAYER_SLIDING, CacheWriter, StoreHeader, check_output_path


@dataclass(frozen=True)
class QueryPolicy:
    """Which query positions to keep: ``mode`` is "none", "all" or "last" (the last ``count``)."""

    mode: str
    count: int = 0

    @classmethod
    def parse(cls, spec: str) -> QueryPolicy:
        spec = spec.strip().lower()
        if spec in ("none", "all"):
            return cls(spec)
        m = re.fullmatch(r"last:(\d+)", spec)
        if not m or int(m.group(1)) < 1:
            raise InputError(f"--queries must be 'none', 'all' or 'last:N' with N >= 1, got {spec!r}")
        return cls("last", int(m.group(1)))

    def window(self, num_tokens: int) -> int:
        """How many of the last positions to record for a sequence of ``num_tokens``."""
        return {"none": 0, "all": num_tokens}.get(self.mode, min(self.count, num_tokens))


@dataclass
class TextInput:
    """One text to run: ``source`` names it in the file (a file name or "prompt")."""

    source: str
    text: str


@dataclass
class SequenceSummary:
    source: str
    num_tokens: int
    truncated_from: int | None
    num_queries: int


@dataclass
class CaptureResult:
    path: Path
    model: str
    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: list[str]
    sequences: list[SequenceSummary] = field(default_factory=list)
    file_bytes: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    #: module -> device (GPU index, "cpu", "disk") when the model was loaded with a device map
    device_map: dict[str, int | str] | None = None


# ------------------------------------------------------------------------------------------ reading text


def read_text(path: Path | str) -> TextInput:
    """Read a UTF-8 text file, with one-line errors for every way it can be unusable."""
    p = Path(path)
    try:
        exists = p.exists()
    except OSError as exc:  # a name too long for the file system, a loop of links
        raise InputError(f"{str(p)[:80]}: not a readable path ({exc.strerror or exc})") from None
    if not exists:
        raise InputError(f"{p}: no such text file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a text file")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{p}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    if not text.strip():
        raise InputError(f"{p}: the text is empty")
    return TextInput(source=p.name, text=text)


def prompt_text(prompt: str) -> TextInput:
    if not prompt.strip():
        raise InputError("--prompt is empty")
    return TextInput(source="prompt", text=prompt)


# ----------------------------------------------------------------------------------- model inspection


def observed_shape(config: Any, cache: Any, rec: Recorder) -> ModelShape:
    """The geometry the forward pass really produced: kv heads and head_dim from the cache tensors,
    query heads from the recorded queries, sliding layers from the cache's own layer objects."""
    guess = model_shape(config)
    layers = cache.layers
    if len(layers) != guess.num_layers:
        raise KvtoolError(f"the model's cache has {len(layers)} layers but its config says {guess.num_layers}")
    keys = layers[0].keys
    if keys is None or keys.ndim != 4:
        raise KvtoolError("the model's cache holds no per-layer key tensors that kvtool understands")
    n_kv, head_dim = int(keys.shape[1]), int(keys.shape[3])
    n_q = rec.q_heads or guess.num_q_heads
    types = tuple(LAYER_SLIDING if getattr(layer, "is_sliding", False) or t == LAYER_SLIDING else LAYER_FULL
                  for layer, t in zip(layers, guess.layer_types, strict=True))
    window = guess.sliding_window or max((int(getattr(layer, "sliding_window", 0) or 0) for layer in layers),
                                         default=0)
    return ModelShape(guess.num_layers, n_q, n_kv, head_dim, types, window)


# ----------------------------------------------------------------------------- what the pass noted


def _heads_first(x: Any, num_kv_heads: int) -> Any:
    """A key tensor of one sequence as (kv_heads, T, d), whichever layout the module produced.

    k_proj gives (T, kv_heads*d); a key norm sees (T, kv_heads, d) in Qwen3 and (kv_heads, T, d) in Gemma 3.
    """
    if x.ndim == 2:
        return x.reshape(x.shape[0], num_kv_heads, -1).transpose(0, 1)
    if x.shape[1] == num_kv_heads and x.shape[0] != num_kv_heads:
        return x.transpose(0, 1)
    return x


def _prerope_hooks(model: Any, rec: Recorder, num_kv_heads: int) -> list[Any]:
    """Forward hooks that note each layer's keys before RoPE: the output of the attention module's
    ``k_norm`` where it has one (Qwen3, Gemma 3), else of ``k_proj``. Returns the hook handles."""
    handles = []
    for module in model.modules():
        source = getattr(module, "k_norm", None) or getattr(module, "k_proj", None)
        layer = getattr(module, "layer_idx", None)
        if source is None or layer is None:
            continue

        def note(_mod: Any, _inp: Any, out: Any, layer: int = int(layer)) -> None:
            rec.prerope[layer] = _heads_first(out[0], num_kv_heads).detach().cpu()

        handles.append(source.register_forward_hook(note))
    if not handles:
        raise InputError("--pre-rope-keys: this model's attention has no k_proj/k_norm module to read keys from")
    return handles


#: Positions per forward call of a capture longer than this (without ``--pre-rope-keys``): the eager
#: attention scores of one call, (q_heads, PIECE, T) floats, then grow with T only, not with T².
PIECE = 4096


def run_and_record(loaded: LoadedModel, input_ids: Any, *, keep_last: int = 0,
                   progress: ProgressFn | None = None, hook: AttentionHook | None = None,
                   pre_rope_keys: bool = False, piece: int | None = None) -> tuple[Any, Recorder]:
    """A forward pass with recording attention; returns (the model's cache, the recorder).

    ``input_ids``: (1, T) long tensor on the model's device. ``piece``: feed at most that many positions per
    forward call, each on top of the cache the previous calls filled (a chunked prefill): the attention
    scores and the MLP's intermediates of one call then stop growing with T, and the cache ends the same up
    to float rounding. The recorder keeps the last ``keep_last`` queries across the calls; ``hook`` sees
    each call's attention.
    """
    import torch

    model = loaded.model
    shape = model_shape(model.config)
    total = int(input_ids.shape[1])
    step = total if not piece or piece >= total else int(piece)
    if pre_rope_keys and step < total:
        raise InputError("--pre-rope-keys needs the whole sequence in one forward pass")
    recorder = Recorder(shape.num_layers, keep_last, progress, hook)
    recorder.calls_total = shape.num_layers * -(-total // step)
    handles = _prerope_hooks(model, recorder, shape.num_kv_heads) if pre_rope_keys else []
    rope = RopeRecorder(model)
    cache = None
    try:
        with recording(model, recorder):
            with torch.inference_mode(), grouped_sdpa(input_ids.device):
                for start in range(0, total, step):
                    kwargs: dict[str, Any] = {"use_cache": True}
                    if cache is not None:
                        kwargs[forward_cache_kwarg(model)] = cache
                    # logits for the last position only: capture needs the cache, not a (T, vocab) matrix.
                    out = model(input_ids=input_ids[:, start:start + step], logits_to_keep=1, **kwargs)
                    cache = output_cache(out)
                    del out
                    recorder.calls_before += shape.num_layers
                    if cache is None:
                        break
            # read after the pass: dynamic RoPE variants update their frequencies during it
            recorder.rope = rope.params(model)
    finally:
        rope.remove()
        for h in handles:
            h.remove()
    if cache is None or not hasattr(cache, "layers"):
        raise KvtoolError(f"{loaded.architecture} returned no layered cache; kvtool needs a decoder whose "
                          "cache is a transformers Cache")
    if keep_last and len(recorder.queries) != shape.num_layers:
        raise KvtoolError(f"{loaded.architecture} does not route attention through transformers' "
                          "AttentionInterface, so its queries cannot be recorded; pass --queries none")
    return cache, recorder


def cache_layer(cache: Any, layer: int) -> tuple[Any, Any]:
    """(keys, values) of one layer from a transformers Cache, each (kv_heads, T_i, head_dim).

    The tensors stay on the device that layer ran on (with a device map: ``cuda:N`` or ``cpu``).
    """
    entry = cache.layers[layer]
    keys, values = entry.keys, entry.values
    if keys is None or values is None or "meta" in (keys.device.type, values.device.type):
        where = "nothing" if keys is None or values is None else "tensors on the 'meta' device"
        raise KvtoolError(f"layer {layer} of the model's cache holds {where}, not keys and values")
    return keys[0], values[0]


def to_host(x: Any, storage: Any) -> np.ndarray:
    """A tensor from whatever device it lives on as a host array of the storage dtype.

    Copied to the CPU first, then cast: the cast then never allocates on a GPU that may be full.
    """
    return x.detach().to("cpu").to(storage).numpy()


# ------------------------------------------------------------------------------------------- capture


def tokenize(loaded: LoadedModel, text: TextInput, max_tokens: int | None) -> tuple[np.ndarray, int | None]:
    """Token ids (T,) and, if truncated by --max-tokens, the original length."""
    ids = loaded.tokenizer(text.text, add_special_tokens=True)["input_ids"]
    if not ids:
        raise InputError(f"{text.source}: the text has no tokens")
    context = loaded.max_context
    if max_tokens is not None:
        if max_tokens < 1:
            raise InputError(f"--max-tokens must be >= 1, got {max_tokens}")
        if context and max_tokens > context:
            raise InputError(f"--max-tokens {max_tokens} exceeds the model's context of {context} tokens")
        if len(ids) > max_tokens:
            return np.asarray(ids[:max_tokens], dtype=np.int64), len(ids)
    elif context and len(ids) > context:
        raise InputError(f"{text.source}: {len(ids)} tokens exceed the model's context of {context}; "
                         f"pass --max-tokens {context} to truncate")
    return np.asarray(ids, dtype=np.int64), None


def capture(loaded: LoadedModel, texts: Sequence[TextInput], output: Path | str, *,
            max_tokens: int | None = None, queries: QueryPolicy | str = "last:128", dtype: str = "float16",
            force: bool = False, pre_rope_keys: bool = False, progress: ProgressFn | None = None,
            on_sequence: Callable[[int, int], None] | None = None) -> CaptureResult:
    """Capture the KV cache of ``loaded`` over each text into one kvtool file at ``output``.

    One forward pass per text; each becomes a sequence of the file. The file appears only when
    every sequence is written (an interruption leaves nothing behind). ``pre_rope_keys`` also stores
    each layer's keys before RoPE (``keys_prerope``), for analysis of what RoPE does to their rank.
    """
    import time

    import torch

    if not texts:
        raise InputError("no text given: use --text FILE (repeatable) or --prompt STR")
    policy = QueryPolicy.parse(queries) if isinstance(queries, str) else queries
    check_output_path(output, force)
    tokenized = [tokenize(loaded, t, max_tokens) for t in texts]  # fail on bad input before any work
    start = time.perf_counter()
    storage = getattr(torch, dtype)
    result: CaptureResult | None = None
    with contextlib.ExitStack() as stack:
        writer: CacheWriter | None = None
        for j, (text, (ids, truncated_from)) in enumerate(zip(texts, tokenized, strict=True)):
            if on_sequence is not None:
                on_sequence(j, len(texts))
            keep = policy.window(len(ids))
            input_ids = torch.as_tensor(ids, device=loaded.device).unsqueeze(0)
            cache, rec = run_and_record(loaded, input_ids, keep_last=keep, progress=progress,
                                        pre_rope_keys=pre_rope_keys, piece=None if pre_rope_keys else PIECE)
            if writer is None:  # the header needs the geometry the first pass really produced
                shape = observed_shape(loaded.config, cache, rec)
                writer = stack.enter_context(CacheWriter(output, _header(loaded, shape, rec, dtype), force=force))
                result = CaptureResult(path=Path(output), model=loaded.spec, architecture=loaded.architecture,
                                       num_layers=shape.num_layers, num_q_heads=shape.num_q_heads,
                                       num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                                       layer_types=list(shape.layer_types), device=loaded.device,
                                       device_map=loaded.device_map)
            seq = writer.add_sequence(ids, source=text.source, text=text.text)
            _write_sequence(writer, seq, cache, rec, shape, len(ids), keep, storage, progress)
            del cache, rec
            result.sequences.append(SequenceSummary(text.source, len(ids), truncated_from, keep))
    result.seconds = time.perf_counter() - start
    result.file_bytes = Path(output).stat().st_size
    return result


def _header(loaded: LoadedModel, shape: ModelShape, rec: Recorder, dtype: str) -> StoreHeader:
    # The scaling the model passed to its attention (Gemma: query_pre_attn_scalar**-0.5; OPT: 1.0
    # because it pre-scales queries); head_dim**-0.5 only when attention never reached kvtool.
    scaling = rec.scaling.get(0, shape.head_dim ** -0.5)
    return StoreHeader(
        model=loaded.spec, model_architecture=loaded.architecture, model_source=loaded.source,
        num_layers=shape.num_layers, num_q_heads=shape.num_q_heads, num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim, attn_scaling=scaling, dtype=dtype,
    )


def _write_sequence(writer: CacheWriter, seq: int, cache: Any, rec: Recorder, shape: ModelShape,
                    num_tokens: int, keep: int, storage: Any, progress: ProgressFn | None) -> None:
    qpos = np.arange(num_tokens - keep, num_tokens, dtype=np.int32)
    for i in range(shape.num_layers):
        keys, values = cache_layer(cache, i)
        t_i = int(keys.shape[1])
        q = rec.queries.get(i)
        pre = rec.prerope.get(i)
        writer.write_layer(
            seq, i,
            _stored(keys, storage, i, "keys"),
            _stored(values, storage, i, "values"),
            queries=_stored(q, storage, i, "queries") if q is not None else None,
            query_positions=qpos if q is not None else None,
            layer_type=shape.layer_types[i],
            sliding_window=shape.sliding_window if shape.layer_types[i] == LAYER_SLIDING else 0,
            key_start=num_tokens - t_i,
            keys_prerope=_stored(pre[:, num_tokens - t_i:, :], storage, i, "pre-RoPE keys") if pre is not None
            else None,
            rope=rec.rope.get(i),
        )
        if progress is not None:
            progress("write", i + 1, shape.num_layers)


def _stored(x: Any, storage: Any, layer: int, name: str) -> np.ndarray:
    """``x`` cast to the storage dtype, as numpy. Refuses (NonFiniteError naming the layer) values the
    model produced as NaN/inf, and values the cast overflows (float16 ends at 65,504; from 65,520 a value
    rounds to infinity). One min/max pass over the tensor (NaN propagates through it)."""
    import torch

    host = x.detach().to("cpu")  # copied first, then cast: the cast never allocates on a full GPU
    if host.numel() == 0:
        return host.to(storage).numpy()
    lo, hi = (float(v) for v in torch.aminmax(host.float() if host.dtype != torch.float32 else host))
    peak = max(-lo, hi)
    if math.isfinite(peak) and (storage != torch.float16 or peak < 65520):
        return host.to(storage).numpy()
    if math.isfinite(peak):
        raise NonFiniteError(f"layer {layer}: {name} reach {peak:.4g}, beyond float16's largest value 65504; "
                             "capture with --dtype float32")
    computing = str(x.dtype).removeprefix("torch.")
    all_float32 = computing == "float32" and storage == torch.float32
    hint = ("the model's weights or its input are broken (float32 cannot help here)" if all_float32
            else "capture with --dtype float32 and --model-dtype float32")
    raise NonFiniteError(f"layer {layer}: the model produced NaN or infinity in its {name} (computing in "
                         f"{computing}); {hint}")

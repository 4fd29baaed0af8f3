"""Contract tests parametrized over the codec registry.

Adding a codec = one row in ``TABLE`` (a spec and its stored bits per element as a formula of head_dim
``d`` and tokens ``t``, for ``HEADS`` heads) and, if it has a bit width, one row in ``MONOTONE``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pytest

from kvtool.codecs import REGISTRY, Composed, Encoded, LayerContext, Selector, Stage, parse_pair, parse_spec
from kvtool.codecs.quant.uniform import Uniform
from kvtool.errors import CodecError

HEADS, TOKENS, DIM = 2, 256, 64

# (spec, stored bits per element at head_dim d and t tokens, HEADS heads)
TABLE: list[tuple[str, object]] = [
    ("none", lambda d, t: 32.0),  # float32 input that no 16-bit format holds exactly
    ("fp16", lambda d, t: 16.0),
    ("fp8:format=e4m3", lambda d, t: 8 + 32 / (t * d)),
    ("fp8:format=e5m2", lambda d, t: 8 + 32 / (t * d)),
    ("uniform:bits=4", lambda d, t: 4 + 32 / d),
    ("uniform:bits=1,group=16", lambda d, t: 1 + 32 / 16),
    ("uniform:bits=3,group=32", lambda d, t: 3 + 32 / 32),
    ("uniform:bits=8,axis=channel", lambda d, t: 8 + 32 / t),
    ("uniform:bits=2,axis=channel,group=64", lambda d, t: 2 + 32 / 64),
    ("kivi:bits=2,axis=channel,group=32,residual=64", lambda d, t: ((t - 64) * (2 + 1) + 64 * 16) / t),
    ("kivi:bits=4,axis=token,group=32,residual=64", lambda d, t: ((t - 64) * (4 + 1) + 64 * 16) / t),
    ("kivi:bits=2,axis=token,group=64,residual=0", lambda d, t: 2 + 0.5),
    ("turboquant:bits=3", lambda d, t: 3 + 16 / d),  # 3.25 at d = 64: codes + fp16 norm
    ("turboquant:bits=1", lambda d, t: 1 + 16 / d),
    ("turboquant:bits=2.5", lambda d, t: 2.5 + 32 / d),  # two channel sets, one norm each
    ("turboquant:bits=3,variant=prod", lambda d, t: 3 + 32 / d),  # + fp16 residual norm
    ("turboquant:bits=1,variant=prod", lambda d, t: 1 + 16 / d),  # QJL alone: no residual norm
    # fp16 first token, fp16 per-head mean, the rest coded as usual
    ("turboquant:bits=3,center=true,sink=1", lambda d, t: (16 + (t - 1) * (3 + 16 / d)) / t + 16 / t),
    # one byte per norm and an fp16 (min, max) of the log-norms per head
    ("turboquant:bits=3,norm_bits=8,unbiased=true", lambda d, t: 3 + 8 / d + 32 / (t * d)),
    ("qjl", lambda d, t: 1 + 16 / d),
    ("qjl:sketch=128", lambda d, t: (128 + 16) / d),
    ("polarquant", lambda d, t: 4 / 2 + 2 * (1 / 2 - 1 / 16) + 16 / 16),  # 3.875
    ("polarquant:bits=3,upper_bits=3,levels=2", lambda d, t: 3 / 2 + 3 / 4 + 16 / 4),
    # token selectors: n = round(keep·t) kept rows in fp16 plus one uint8 index each (t <= 256)
    ("streaming:keep=0.25", lambda d, t: _kept(0.25, t) * (16 * d + 8) / (t * d)),
    ("streaming:recent=60,sink=4", lambda d, t: 64 * (16 * d + 8) / (t * d)),
    ("knorm:keep=0.5", lambda d, t: _kept(0.5, t) * (16 * d + 8) / (t * d)),
    ("h2o:keep=0.5", lambda d, t: _kept(0.5, t) * (16 * d + 8) / (t * d)),
    ("snapkv:keep=0.25,window=8", lambda d, t: _kept(0.25, t) * (16 * d + 8) / (t * d)),
    ("tova:keep=0.75,sink=1", lambda d, t: _kept(0.75, t) * (16 * d + 8) / (t * d)),
    ("expected:keep=0.5", lambda d, t: _kept(0.5, t) * (16 * d + 8) / (t * d)),
    ("kvzip:keep=0.5", lambda d, t: _kept(0.5, t) * (16 * d + 8) / (t * d)),
    # age bands: the newest 64 tokens in fp16, the rest at 4 bits (+ fp16 scale and zero per token)
    ("age:bands=[0-64:fp16;64-:uniform:bits=4]", lambda d, t: (64 * 16 * d + (t - 64) * (4 * d + 32)) / (t * d)),
    ("age:bands=[0-32:fp16;32-128:turboquant:bits=4;128-:turboquant:bits=2],sink=4",
     lambda d, t: (36 * 16 * d + 96 * (4 * d + 16) + (t - 132) * (2 * d + 16)) / (t * d)),
    ("drop", lambda d, t: 0.0),  # nothing stored, every row evicted
    # salient: the kept quarter in fp16, the rest in 1-bit TurboQuant (+ fp16 norm), one mask bit per token
    ("salient:select=[knorm:keep=0.25],hi=[fp16],lo=[turboquant:bits=1]",
     lambda d, t: (_kept(0.25, t) * 16 * d + (t - _kept(0.25, t)) * (d + 16) + 8 * -(-t // 8)) / (t * d)),
    ("minicache:start=0", lambda d, t: 16.0),  # one layer alone is fp16; pairs are coded in compress
    ("age:bands=[0-64:fp16;64-:h2o:keep=0.5+turboquant:bits=3]",
     lambda d, t: (64 * 16 * d + _kept(0.5, t - 64) * (8 + 3 * d + 16)) / (t * d)),
    ("h2o:keep=0.5+turboquant:bits=3", lambda d, t: _kept(0.5, t) * (8 + 3 * d + 16) / (t * d)),
    ("snapkv:keep=0.25+uniform:bits=4", lambda d, t: _kept(0.25, t) * (8 + 4 * d + 32) / (t * d)),
    # token 0 in fp16, the rest as 16 fp16 coefficients (the basis is shared state, not counted here)
    ("lowrank:rank=16", lambda d, t: (16 * d + (t - 1) * 16 * 16) / (t * d)),
    ("lowrank:rank=24,sink=0,group=all", lambda d, t: 24 * 16 / (HEADS * d)),  # one basis for both heads
    # chained: the 16 coefficients of each token coded by TurboQuant at head_dim 16 (4 bits + fp16 norm)
    ("lowrank:rank=16+turboquant:bits=4", lambda d, t: (16 * d + (t - 1) * (16 * 4 + 16)) / (t * d)),
    ("lowrank:rank=8,sink=4+uniform:bits=8,group=8", lambda d, t: (4 * 16 * d + (t - 4) * 8 * (8 + 4)) / (t * d)),
    # learned codebooks: faiss codes, ceil(code bits / 8) bytes per vector (codebooks are shared state)
    ("pq", lambda d, t: 8 * 16 / d),  # m=16 sub-vectors of 8 bits
    ("pq:m=4,bits=3", lambda d, t: 8 * 2 / d),  # 12 bits per vector -> 2 bytes
    ("pq:m=8,bits=4,rotation=random", lambda d, t: 8 * 4 / d),
    ("pq:m=8,bits=5,rotation=opq", lambda d, t: 8 * 5 / d),
    ("vq", lambda d, t: 8 * 4 / d),  # 4 stages of 8 bits
    ("vq:stages=3,bits=5", lambda d, t: 8 * 2 / d),
    # KVQuant keys: token 0 in fp16; the rest per channel (fp16 scale+zero per channel), 1 % outliers kept
    # as fp16 value + uint16 index
    ("kvquant:bits=3,role=keys",
     lambda d, t: (16 * d + (t - 1) * d * 3 + 32 * d + 32 * math.ceil(0.01 * (t - 1) * d)) / (t * d)),
    ("kvquant:bits=4,role=values,outliers=0,sink=0", lambda d, t: 4 + 32 / d),
    ("outliers:frac=0.01+uniform:bits=4", lambda d, t: 4 + 32 / d + 32 * math.ceil(0.01 * t * d) / (t * d)),
    ("smooth:alpha=0.5+turboquant:bits=3", lambda d, t: 3 + 16 / d + 16 / t),  # + fp16 scale per channel
]

# (spec template with {} for the bit width, bit widths in increasing order)
MONOTONE: list[tuple[str, list[object]]] = [
    ("uniform:bits={}", list(range(1, 9))),
    ("uniform:bits={},axis=channel,group=32", list(range(1, 9))),
    ("kivi:bits={},axis=channel,residual=16", list(range(1, 9))),
    ("kivi:bits={},axis=token,residual=16", list(range(1, 9))),
    ("turboquant:bits={}", list(range(1, 9))),
    ("turboquant:bits={},variant=prod", list(range(1, 9))),
    ("qjl:sketch={}", [16, 64, 256]),
    ("polarquant:bits={0},upper_bits={0}", list(range(1, 7))),
    ("knorm:keep={}", [0.125, 0.25, 0.5, 1.0]),
    ("snapkv:keep={},window=8", [0.125, 0.25, 0.5, 1.0]),
    ("lowrank:rank={}", [1, 2, 4, 8, 16, 32, 64]),
    ("lowrank:rank=32+turboquant:bits={}", list(range(1, 9))),
    ("pq:m=16,bits={}", [1, 2, 4, 6, 8]),
    ("vq:stages={},bits=6", [1, 2, 4]),
    ("kvquant:bits={},role=keys", list(range(1, 9))),
    ("outliers:frac=0.01+turboquant:bits={}", list(range(1, 9))),
]


def _kept(keep: float, tokens: int) -> int:
    return max(1, int(keep * tokens + 0.5))


def cache_like(seed: int = 0, heads: int = HEADS, tokens: int = TOKENS, dim: int = DIM) -> np.ndarray:
    """Gaussian vectors with a few large-magnitude channels, like real keys. (heads, tokens, dim)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((heads, tokens, dim)).astype(np.float32)
    x[:, :, :: dim // 4] *= 8.0  # outlier channels
    return x


def rel_mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(((x - y) ** 2).sum() / (x**2).sum())


def context_for(x: np.ndarray, seed: int = 0) -> LayerContext:
    """A keys context with 2 query heads per kv head at the last (up to) 16 positions, like a capture."""
    heads, tokens, dim = x.shape
    n = min(16, tokens)
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((2 * heads, n, dim)).astype(np.float32)
    values = rng.standard_normal(x.shape)
    return LayerContext(layer=0, role="keys", queries=queries, query_positions=np.arange(tokens - n, tokens),
                        key_positions=np.arange(tokens), keys=x, values=values,
                        rope_inv_freq=10000.0 ** (-np.arange(dim // 2) * 2.0 / dim),
                        reconstruction=rng.random((heads, tokens)))  # kvzip's scores, as kvtool eval gives them


def roundtrip(spec: str, x: np.ndarray) -> tuple[Encoded, np.ndarray]:
    codec = parse_spec(spec).fit(x, context_for(x))
    enc = codec.encode(x)
    return enc, codec.decode(enc)


def test_every_registered_codec_has_a_row() -> None:
    covered = {spec.split(":")[0] for spec, _ in TABLE}
    assert set(REGISTRY) <= covered, f"add rows to TABLE for {sorted(set(REGISTRY) - covered)}"


@pytest.mark.parametrize("spec,bits", TABLE, ids=[row[0] for row in TABLE])
def test_roundtrip_shape_dtype_and_honest_bytes(spec: str, bits) -> None:
    x = cache_like()
    enc, y = roundtrip(spec, x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.isfinite(y).all()
    assert enc.shape == x.shape
    assert enc.nbytes == sum(a.nbytes for a in enc.arrays.values())
    assert enc.bits_per_element() == pytest.approx(bits(DIM, TOKENS), rel=1e-9)
    if spec != "none":
        assert enc.bits_per_element() < 32  # never worse than the float32 input
    for name, array in enc.arrays.items():
        assert re.fullmatch(r"[A-Za-z0-9_.]+", name), name
        assert isinstance(array, np.ndarray) and array.dtype != np.float64, name
    for value in enc.meta.values():
        assert isinstance(value, (int, float, str)) and not isinstance(value, bool)


@pytest.mark.parametrize("spec", [row[0] for row in TABLE])
def test_decode_needs_only_the_stored_arrays(spec: str) -> None:
    x = cache_like(1)
    enc, y = roundtrip(spec, x)
    stored = Encoded({k: np.array(v) for k, v in enc.arrays.items()}, enc.shape, dict(enc.meta))
    fresh = parse_spec(parse_spec(spec).spec())
    fresh.load_shared_state(parse_spec(spec).fit(x, context_for(x)).shared_state())
    np.testing.assert_array_equal(fresh.decode(stored), y)


@pytest.mark.parametrize("spec", [row[0] for row in TABLE])
def test_spec_round_trips(spec: str) -> None:
    codec = parse_spec(spec)
    again = parse_spec(codec.spec())
    assert again == codec and again.spec() == codec.spec()
    first = codec.head if isinstance(codec, Composed) else codec  # a chain starts with its first stage
    assert codec.spec().startswith(first.name)


@pytest.mark.parametrize("spec", [row[0] for row in TABLE])
def test_odd_shapes(spec: str) -> None:
    for shape in [(1, 1, DIM), (3, 37, DIM), (1, 300, 2 * DIM)]:
        x = cache_like(2, *shape)
        _, y = roundtrip(spec, x)
        assert y.shape == x.shape and np.isfinite(y).all()


@pytest.mark.parametrize("template,widths", MONOTONE, ids=[row[0] for row in MONOTONE])
def test_error_does_not_rise_with_bits(template: str, widths: list[object]) -> None:
    x = cache_like(3)
    errors = [rel_mse(x, roundtrip(template.format(b), x)[1]) for b in widths]
    for lo, hi in zip(errors, errors[1:], strict=False):
        assert hi <= lo * 1.0001, errors
    assert errors[-1] < errors[0]


def test_identity_and_near_identity() -> None:
    x = cache_like(4)
    assert rel_mse(x, roundtrip("fp16", x)[1]) < 1e-6
    assert rel_mse(x, roundtrip("uniform:bits=8", x)[1]) < 1e-4
    assert rel_mse(x, roundtrip("fp8:format=e4m3", x)[1]) < 2e-3


# -- the spec parser ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nope", "unknown codec 'nope'; registered codecs: "),
        ("uniform:bitz=3", "its parameters: bits, axis, group"),
        ("uniform:bits=9", "bits must be one of 1..8, got 9"),
        ("uniform:bits=0", "bits must be one of 1..8, got 0"),
        ("uniform:bits=2.5", "bits must be an integer, got 2.5"),
        ("uniform:axis=diagonal", "axis must be one of token, channel, got diagonal"),
        ("uniform:bits", "needs a value"),
        ("uniform:bits=2,bits=3", "given twice"),
        ("fp8:format=e3m4", "format must be one of e4m3, e5m2, got e3m4"),
        ("kivi:residual=-1", "residual"),
        ("uniform:bits=4+kivi", "two quantizers cannot be chained"),
        ("", "empty codec spec"),
    ],
)
def test_bad_specs_name_the_allowed_values(spec: str, message: str) -> None:
    with pytest.raises(CodecError, match=re.escape(message)):
        parse_spec(spec)


def test_group_must_divide_head_dim() -> None:
    with pytest.raises(CodecError, match="group must divide head_dim=64 .* got 48"):
        parse_spec("uniform:group=48").fit(cache_like())
    parse_spec("uniform:group=48,axis=channel").fit(cache_like())  # tokens need not divide


def test_spec_is_case_and_space_tolerant() -> None:
    assert parse_spec(" Uniform : bits = 3 , group=16 ") == Uniform(bits=3, group=16)


def test_pair_assigns_roles() -> None:
    keys, values = parse_pair(method="kivi:bits=4")
    assert (keys.axis, values.axis) == ("channel", "token")
    keys, values = parse_pair(keys="uniform:bits=8", values="fp16")
    assert keys.spec() == "uniform:bits=8,axis=token,group=0" and values.spec() == "fp16"
    keys, values = parse_pair(method="fp16", values="uniform")
    assert (keys.name, values.name) == ("fp16", "uniform")
    with pytest.raises(CodecError, match="--method SPEC"):
        parse_pair(keys="fp16")
    with pytest.raises(CodecError, match="axis=auto needs a role"):
        roundtrip("kivi", cache_like())


# -- composition with a token selector (test-only selector; real ones come with the eviction issue) --------


@dataclass
class KeepRecent(Selector):
    keep: int = 100
    name = "keeprecent"

    def select(self, x: np.ndarray) -> np.ndarray:
        heads, tokens, _ = x.shape
        start = max(tokens - self.keep, 0)
        return np.broadcast_to(np.arange(start, tokens), (heads, tokens - start))


def test_selector_alone_zeroes_evicted_rows_and_counts_indices() -> None:
    x = cache_like(5)
    codec = KeepRecent(keep=100)
    enc = codec.fit(x).encode(x)
    y = codec.decode(enc)
    assert (y[:, :-100] == 0).all() and np.allclose(y[:, -100:], x[:, -100:], atol=1e-2)
    mask = codec.token_mask(enc)
    assert mask.shape == (HEADS, TOKENS) and mask[:, -100:].all() and not mask[:, :-100].any()
    assert enc.nbytes == HEADS * 100 * (DIM * 2 + 1)  # fp16 rows + uint8 indices (256 tokens)


def test_composed_selector_then_quantizer() -> None:
    x = cache_like(6)
    codec = Composed(KeepRecent(keep=128), Uniform(bits=4))
    enc = codec.fit(x).encode(x)
    y = codec.decode(enc)
    assert codec.spec() == "keeprecent:keep=128+uniform:bits=4,axis=token,group=0"
    assert set(enc.arrays) == {"kept", "inner.codes", "inner.scale", "inner.zero"}
    assert enc.bits_per_element() == pytest.approx((128 * (4 + 0.5) + 128 * 8 / DIM) / TOKENS)
    assert (y[:, :128] == 0).all()
    assert rel_mse(x[:, 128:], y[:, 128:]) < 0.05
    assert codec.token_mask(enc)[:, 128:].all()
    nested = Composed(KeepRecent(keep=200), Composed(KeepRecent(keep=50), Uniform(bits=8)))
    enc = nested.fit(x).encode(x)
    assert nested.token_mask(enc).sum() == HEADS * 50
    assert (nested.decode(enc)[:, :-50] == 0).all()


# -- generalised stages: a transform whose payload is not rows of x (test-only) -----------------------------


@dataclass
class SplitHalf(Stage):
    """Stores the upper half of the channels in fp16 and hands the lower half (``d/2`` wide) on."""

    name = "splithalf"
    payload_name = "lower"

    def payload_dim(self, head_dim: int | None) -> int | None:
        return None if head_dim is None else head_dim // 2

    def split(self, x: np.ndarray):
        d = x.shape[-1]
        return {"upper": x[:, :, d // 2:].astype(np.float16)}, x[:, :, : d // 2], {"half": d // 2}

    def merge(self, own: Encoded, payload: np.ndarray) -> np.ndarray:
        return np.concatenate([payload, own.arrays["upper"].astype(np.float32)], axis=-1)

    def payload_shape(self, own: Encoded) -> tuple[int, int, int]:
        return own.shape[0], own.shape[1], int(own.meta["half"])


def test_stage_alone_stores_its_payload_in_fp16() -> None:
    x = cache_like(7)
    codec = SplitHalf()
    enc = codec.fit(x).encode(x)
    assert set(enc.arrays) == {"upper", "lower"} and enc.bits_per_element() == 16
    np.testing.assert_allclose(codec.decode(enc), x, rtol=1e-3, atol=1e-2)
    assert codec.token_mask(enc) is None


def test_transform_stage_then_quantizer_counts_both_and_validates_the_payload_dim() -> None:
    x = cache_like(8)
    codec = Composed(SplitHalf(), Uniform(bits=4, group=32))
    enc = codec.fit(x).encode(x)
    assert set(enc.arrays) == {"upper", "inner.codes", "inner.scale", "inner.zero"}
    assert enc.meta == {"half": DIM // 2}
    # upper half fp16 (8 bits per element overall) + lower half 4-bit with fp16 scale/zero per 32
    assert enc.bits_per_element() == pytest.approx(8 + (4 + 32 / 32) / 2)
    y = codec.decode(enc)
    np.testing.assert_array_equal(y[:, :, DIM // 2:], x[:, :, DIM // 2:].astype(np.float16))
    assert 0 < rel_mse(x[:, :, : DIM // 2], y[:, :, : DIM // 2]) < 0.05
    with pytest.raises(CodecError, match="'uniform' after 'splithalf' codes vectors of 32 values.*group must"):
        Composed(SplitHalf(), Uniform(bits=4, group=64)).validate(DIM)
    Composed(SplitHalf(), Uniform(bits=4, group=64)).validate(2 * DIM)  # 64 wide payload: fine


def test_three_stages_nest_and_mask_through_every_stage() -> None:
    x = cache_like(9)
    codec = Composed(KeepRecent(keep=100), Composed(SplitHalf(), Uniform(bits=8)))
    enc = codec.fit(x).encode(x)
    assert set(enc.arrays) == {"kept", "inner.upper", "inner.inner.codes", "inner.inner.scale",
                               "inner.inner.zero"}
    assert enc.meta == {"inner.half": DIM // 2}
    assert enc.nbytes == HEADS * 100 * (1 + DIM // 2 * 2 + DIM // 2 + 4)  # idx, fp16 upper, 8-bit, scale+zero
    y = codec.decode(enc)
    assert (y[:, :-100] == 0).all() and rel_mse(x[:, -100:], y[:, -100:]) < 1e-3
    mask = codec.token_mask(enc)
    assert mask[:, -100:].all() and not mask[:, :-100].any()
    fresh = Composed(KeepRecent(keep=100), Composed(SplitHalf(), Uniform(bits=8)))
    np.testing.assert_array_equal(fresh.decode(Encoded(dict(enc.arrays), enc.shape, dict(enc.meta))), y)

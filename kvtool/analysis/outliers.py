"""Outliers and scale: along which axis should a uniform quantizer group, and does rotation help?

KIVI (arXiv 2402.02750, §3) observed that keys have a few *channels* of large magnitude while values
do not, so keys quantize best with statistics per channel (a group of tokens shares a scale per
channel) and values per token. This module measures that observation on the captured cache instead
of assuming it:

* per-channel magnitude: the max |x| and the RMS of every channel over the tokens; a channel whose RMS
  exceeds ``OUTLIER_FACTOR`` × the median channel's is an outlier channel. RMS rather than max, because
  KIVI's outlier channels are large on most tokens (which is what spoils a per-token scale), not on one;
* per-token vs per-channel variance: how much the mean energy varies across channels vs across
  tokens (a dispersion, 0 for perfectly even scale);
* the decision itself: a simulated ``SIM_BITS``-bit min-max quantizer grouped per token (one token's
  ``head_dim`` channels share a scale) vs per channel (``head_dim`` consecutive tokens of one channel
  share a scale) — same number of scales, so the lower relative error names the better axis. This is
  reconstruction error only; KIVI also argues for per-token values from the attention output (errors
  of one token stay in that token), which `kvtool compress` measures with queries;
* kurtosis of the entries (Gaussian = 3) before and after a seeded random orthogonal rotation of the
  channels. A rotation spreads an outlier channel's energy over all channels, leaving near-Gaussian
  coordinates (the premise of TurboQuant, arXiv 2504.19874, §3, and of QJL/QuaRot): when kurtosis
  drops a lot, rotate-then-quantize per token is the cheaper alternative to per-channel grouping.
"""

from __future__ import annotations

from typing import Any

import torch

OUTLIER_FACTOR = 4.0  # channel RMS ≥ 4× the median channel's; Gaussian channels stay within ~1.2×
SIM_BITS = 4  # KIVI's and most evaluations' default width
AXIS_MARGIN = 1.2  # one axis must beat the other by 20 % to be recommended over the default
HEAVY_TAILED = 4.0  # kurtosis above this is heavy-tailed (Gaussian 3)
ROTATION_GAIN = 0.75  # rotation "helps" when it cuts kurtosis to ≤ 75 % of the original
DEFAULT_SEED = 0


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """Max |x| of every channel over the tokens: (heads, tokens, d) → (heads, d), without an |x| copy."""
    return torch.maximum(x.amax(dim=1), x.amin(dim=1).neg())


def channel_rms(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square of every channel over the tokens: (heads, tokens, d) → (heads, d)."""
    return torch.stack([head.square().mean(dim=0, dtype=torch.float64).sqrt() for head in x]).float()


def outlier_channels(magnitude: torch.Tensor, factor: float = OUTLIER_FACTOR) -> list[list[int]]:
    """Indices of channels above ``factor`` × the head's median channel, from magnitudes (heads, d)."""
    med = magnitude.median(dim=1, keepdim=True).values  # (heads, 1)
    return [torch.nonzero(row > factor * m).flatten().tolist() for row, m in zip(magnitude, med, strict=True)]


def _kurtosis_head(head: torch.Tensor) -> float:
    """Pearson kurtosis of all entries of one head (tokens, d), in float64."""
    c = head.reshape(-1).to(torch.float64)
    c -= c.mean()
    c2 = c.square_()
    m2 = float(c2.mean())
    return float(c2.square_().mean()) / m2 ** 2 if m2 > 0 else 0.0


def kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Pearson kurtosis of all entries of each head: (heads, tokens, d) → (heads,). Gaussian = 3.

    One head at a time, so the float64 temporaries are a fraction of the layer.
    """
    return torch.tensor([_kurtosis_head(head) for head in x], dtype=torch.float64)


def random_rotation(d: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """A Haar-random orthogonal (d, d) matrix from a seeded generator (QR with the sign fix)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


def scale_dispersion(x: torch.Tensor) -> dict[str, float]:
    """Variance of the mean energy across channels and across tokens, relative to its mean².

    x: (heads, tokens, d). Outlier channels raise ``per_channel``; tokens of very different norm
    (attention sinks, punctuation) raise ``per_token``. One head at a time.
    """
    ch, tok = [], []
    for head in x:
        e = head.to(torch.float64).square_()  # (T, d)
        ch.append(e.mean(dim=0))
        tok.append(e.mean(dim=1))
    mu2 = torch.stack(ch).mean().clamp_min(1e-300) ** 2  # every head has T·d entries: mean of means
    return {"per_channel": float(torch.stack([c.var(unbiased=False) for c in ch]).mean() / mu2),
            "per_token": float(torch.stack([t.var(unbiased=False) for t in tok]).mean() / mu2)}


def fake_quant_lastdim(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max quantize-dequantize in groups of ``group`` along the last axis.

    x: (..., n) → (..., n). The last group is padded with its own last element, which leaves its
    min and max unchanged.
    """
    n = x.shape[-1]
    pad = (-n) % group
    xp = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1) if pad else x
    g = xp.reshape(*x.shape[:-1], -1, group)  # (..., n_groups, group)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    step = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-12)
    deq = torch.round((g - lo) / step) * step + lo
    return deq.reshape(*x.shape[:-1], -1)[..., :n]


def _quant_error(head: torch.Tensor, axis: str, bits: int) -> tuple[float, float]:
    """(Σ squared error, Σ x²) of one head (tokens, d) through the simulated quantizer."""
    d = head.shape[-1]
    y = head if axis == "per-token" else head.T  # groups run along the last axis
    err = (y - fake_quant_lastdim(y, bits, d)).square_().sum(dtype=torch.float64)
    return float(err), float(head.square().sum(dtype=torch.float64))


def quant_rel_mse(x: torch.Tensor, axis: str, bits: int = SIM_BITS) -> float:
    """Relative MSE of a simulated min-max quantizer grouped per token or per channel.

    x: (heads, tokens, d). Per token: each token's d channels share a scale. Per channel: each run of
    d consecutive tokens of one channel shares one (KIVI's grouping for keys), the same scale count.
    """
    sums = [_quant_error(head, axis, bits) for head in x]
    energy = sum(e for _, e in sums)
    return sum(err for err, _ in sums) / energy if energy > 0 else 0.0


def rotated_figures(x: torch.Tensor, rotation: torch.Tensor, bits: int = SIM_BITS
                    ) -> tuple[torch.Tensor, float]:
    """Kurtosis per head (heads,) and per-token relative MSE after rotating the channels of x.

    x: (heads, tokens, d); rotation (d, d) orthogonal keeps every token's norm. One head at a time.
    """
    kurt, err, energy = [], 0.0, 0.0
    for head in x:
        r = head @ rotation  # (tokens, d)
        kurt.append(_kurtosis_head(r))
        e, n = _quant_error(r, "per-token", bits)
        err, energy = err + e, energy + n
    return torch.tensor(kurt, dtype=torch.float64), err / energy if energy > 0 else 0.0


def recommend_axis(err_token: float, err_channel: float) -> str:
    """Per channel only when it clearly wins: per-token needs no residual buffer when streaming."""
    return "per-channel" if err_channel * AXIS_MARGIN < err_token else "per-token"


def recommend_scheme(errors: dict[str, float]) -> str:
    """The quantizer layout to use: plain per-token unless per-channel or rotate-then-per-token beats it
    by AXIS_MARGIN; between those two, the lower error. ``errors`` is the ``quant_rel_mse`` dict."""
    plain = errors["per-token"]
    options = {"per-channel": errors["per-channel"], "rotate+per-token": errors["per-token-rotated"]}
    better = {k: v for k, v in options.items() if v * AXIS_MARGIN < plain}
    return min(better, key=better.__getitem__) if better else "per-token"


def tensor_outliers(x: torch.Tensor, rotation: torch.Tensor) -> dict[str, Any]:
    """Outlier figures of keys or values x: (heads, tokens, d); rotation: (d, d) orthogonal."""
    absmax, rms = channel_absmax(x), channel_rms(x)  # (heads, d) each
    kurt = kurtosis(x)
    kurt_rot, err_rot = rotated_figures(x, rotation)
    err_tok, err_ch = quant_rel_mse(x, "per-token"), quant_rel_mse(x, "per-channel")
    errors = {"per-token": err_tok, "per-channel": err_ch, "per-token-rotated": err_rot}
    return {
        "channel_absmax": absmax.tolist(),  # (heads, d)
        "channel_rms": rms.tolist(),  # (heads, d): the magnitude profile the plots draw
        "max_over_median": _max_over_median(absmax),  # largest channel max ÷ median channel max
        "rms_max_over_median": _max_over_median(rms),
        "outlier_channels": outlier_channels(rms),
        "kurtosis": kurt.tolist(),
        "kurtosis_rotated": kurt_rot.tolist(),
        "scale_dispersion": scale_dispersion(x),
        "quant_rel_mse": {"bits": SIM_BITS, **errors},
        "recommended_axis": recommend_axis(err_tok, err_ch),
        "recommended_scheme": recommend_scheme(errors),
        "rotation_helps": _rotation_helps(kurt, kurt_rot),
    }


def _max_over_median(m: torch.Tensor) -> list[float]:
    """(heads, d) → (heads,): the largest channel over the median one."""
    return (m.amax(dim=1) / m.median(dim=1).values.clamp_min(1e-30)).tolist()


def _rotation_helps(kurt: torch.Tensor, kurt_rot: torch.Tensor) -> bool:
    """Heavy-tailed on average, and the rotation brings kurtosis down by at least 1 - ROTATION_GAIN."""
    before, after = float(kurt.mean()), float(kurt_rot.mean())
    return before > HEAVY_TAILED and after <= ROTATION_GAIN * before


def analyze_outliers(keys: torch.Tensor, values: torch.Tensor, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Outlier section of one layer. keys, values: (kv_heads, tokens, d) float32."""
    rotation = random_rotation(keys.shape[-1], seed)
    return {"seed": seed, "keys": tensor_outliers(keys, rotation),
            "values": tensor_outliers(values, rotation)}

"""The terminal view of an analysis result: one line per layer, key figures and the recommendation."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

COLUMNS: tuple[tuple[str, str], ...] = (
    ("layer", "layer index (s: sliding-window layer)"),
    ("rank95 K/V", "mean per-head effective rank of keys/values at 95 % energy (of head_dim)"),
    ("K outl.", "outlier key channels (RMS ≥ 4× the median channel; distinct over heads) and the "
                "largest RMS ratio"),
    ("kurt K→rot", "kurtosis of keys (Gaussian 3) before → after a random rotation"),
    ("sink", "attention mass on the first 4 tokens (mean over query heads)"),
    ("local", "attention mass on the last 64 tokens"),
    ("keep", "fraction of keys holding 90 % of the attention (worst head)"),
    ("prev cos K/V", "mean cosine of keys/values with the previous analysed layer"),
    ("recommendation", ""),
)


def _mean(xs: list[float | None]) -> float:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else float("nan")


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None or not np.isfinite(x) else format(x, spec)


def _outlier_cell(o: dict[str, Any]) -> str:
    channels = sorted({c for head in o["outlier_channels"] for c in head})
    ratio = max((r for r in o["rms_max_over_median"] if r is not None), default=None)
    return f"{len(channels)} (×{_fmt(ratio, '.0f')})" if channels else "0"


def _row(e: dict[str, Any]) -> list[str]:
    s, ko = e["spectrum"], e["outliers"]["keys"]
    ranks = "/".join(_fmt(_mean(s[n]["per_head"]["rank95"]), ".0f") for n in ("keys", "values"))
    a, prev = e.get("attention"), e["similarity"]["previous"]
    att = ["—"] * 3 if a is None else [_fmt(_mean(a["sink_mass"])), _fmt(_mean(a["local_mass"])),
                                        _fmt(a["recommendation"]["keep_fraction"], ".0%")]
    cos = "—" if not prev or "keys" not in prev else \
        f"{_fmt(prev['keys']['mean_cosine'])}/{_fmt(prev['values']['mean_cosine'])}"
    kurt = f"{_fmt(_mean(ko['kurtosis']), '.1f')}→{_fmt(_mean(ko['kurtosis_rotated']), '.1f')}"
    return [f"{e['layer']}{'s' if e['layer_type'] == 'sliding' else ''}", ranks,
            _outlier_cell(ko), kurt, *att, cos, e["recommendation"]["text"]]


def summary_table(result: dict[str, Any], recommendation: bool = True) -> Table:
    """One row per analysed layer; the recommendation as the last column, or left out."""
    title = (f"{result['model']} ({result['model_architecture']}): {result['num_layers']} layers, "
             f"{result['num_q_heads']} q / {result['num_kv_heads']} kv heads, head_dim {result['head_dim']}, "
             f"{result['num_tokens']} tokens")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    columns = COLUMNS if recommendation else COLUMNS[:-1]
    for name, _ in columns:
        table.add_column(name, justify="left" if name == "recommendation" else "right",
                         no_wrap=name != "recommendation")
    for e in result["layers"]:
        table.add_row(*_row(e)[:len(columns)])
    return table


def recommendation_table(result: dict[str, Any]) -> Table:
    """layer → recommendation, for terminals too narrow to hold it beside the figures."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("recommendation")
    for e in result["layers"]:
        table.add_row(str(e["layer"]), e["recommendation"]["text"])
    return table


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The file-level findings under the table, then the notes."""
    s = result["summary"]
    lines = [f"mean rank at 95 % energy: keys {_fmt(s['mean_rank95']['keys'], '.1f')}, "
             f"values {_fmt(s['mean_rank95']['values'], '.1f')} of {result['head_dim']}",
             "quantizer layout (simulated 4-bit): keys " + _counts(s["schemes"]["keys"])
             + "; values " + _counts(s["schemes"]["values"])]
    if s["mean_sink_mass"] is not None:
        lines.append(f"attention: sink mass {s['mean_sink_mass']:.2f}, "
                     f"local mass {s['mean_local_mass']:.2f}, 90 % of the mass in "
                     f"{s['mean_keep_fraction']:.0%} of the keys (mean over layers)")
    if s.get("codec"):
        c = s["codec"]
        lines.append(f"codec to start from ({c['why']}): --keys {c['keys']} --values {c['values']}; "
                     "refine with `kvtool plan` and judge with `kvtool eval`")
    shared = s["sharing_candidates"]
    lines.append(f"cross-layer sharing candidates (cosine ≥ 0.9 with the previous layer): "
                 f"{', '.join(map(str, shared)) if shared else 'none'}")
    lines += [f"note: {n}" for n in result["notes"]]
    if result.get("plots"):
        lines.append(f"plots: {', '.join(result['plots'])}")
    return lines


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} in {v} layers" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))


WIDE = 140  # narrower terminals get the recommendations as a second table


def render_analysis(result: dict[str, Any], console: Console) -> None:
    """Print the table, a legend of its columns, and the file-level lines."""
    wide = console.width >= WIDE
    console.print(summary_table(result, recommendation=wide))
    if not wide:
        console.print(recommendation_table(result))
    console.print("columns: " + "; ".join(f"{n}: {h}" for n, h in COLUMNS if h), style="dim")
    for line in summary_lines(result):
        console.print(line, highlight=False)

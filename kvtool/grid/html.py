"""`kvtool report`: one self-contained static HTML page from grid results and kvtool JSON reports.

Inputs: grid results folders (or one of their Parquet files), ``eval`` JSON reports (one row per method),
``task`` JSON reports (`kvtool eval --task`: the heatmaps), ``compress`` JSON reports (the per-layer error
profile). The page holds, per model, a table of the cells and
the KLD-vs-stored-bits frontier; a depth × length accuracy heatmap per task and method when task rows are
present; one per-layer error profile per compress report; and the failed cells with their errors. Plots are
plotly figures with plotly.js inlined once in the page, so it opens offline from a file or a CI artifact.
plotly is the optional extra ``kvtool[grid]``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.grid.cells import EVAL_METHOD_FIELDS
from kvtool.grid.results import read_results
from kvtool.util import write_text_atomic

#: Columns of the per-model tables: (row field, header, format).
TABLE_COLUMNS = (("text", "text", "{}"), ("context", "context", "{}"), ("mode", "mode", "{}"),
                 ("method", "method", "{}"), ("bits_per_element", "bits", "{:.3f}"),
                 ("delta_ppl_pct", "Δppl %", "{:+.3f}"), ("kld_mean", "KLD", "{:.5f}"),
                 ("kld_p99", "KLD p99", "{:.4f}"), ("top1_agreement", "top-1", "{:.2%}"))


@dataclass
class ReportInputs:
    rows: list[dict[str, Any]] = field(default_factory=list)  # grid rows (eval and task cells)
    compress: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (name, compress report)
    tasks: list[dict[str, Any]] = field(default_factory=list)  # task reports given as inputs
    sources: list[str] = field(default_factory=list)


def load_inputs(paths: Sequence[Path | str]) -> ReportInputs:
    """Read every input; one-line InputError for a path that is none of the accepted kinds."""
    out = ReportInputs()
    if not paths:
        raise InputError("give at least one input: a grid results folder, an eval or a compress JSON report")
    for p in map(Path, paths):
        out.sources.append(str(p))
        if p.is_dir() or p.suffix == ".parquet":
            out.rows += read_results(p)
            continue
        if not p.is_file():
            raise InputError(f"{p}: no such file or folder")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{p}: not a JSON report nor a results folder ({exc})") from None
        kind = data.get("kvtool_report") if isinstance(data, dict) else None
        if kind == "compress":
            out.compress.append((p.name, data))
        elif kind == "eval":
            out.rows += rows_from_eval(data, p.name)
        elif kind == "task":
            out.tasks.append(data)
        else:
            raise InputError(f"{p}: a JSON report of kind {kind!r}; `kvtool report` reads grid results, "
                             f"eval, task and compress reports")
    return out


def rows_from_eval(report: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Grid-like rows from an ``eval`` report: one per method."""
    base = {"kind": "eval", "status": "ok", "error": None, "model": report.get("model"),
            "text": report.get("text") or name, "context": report.get("context"), "mode": report.get("mode")}
    return [{**base, "method": m.get("label"), "cell_id": f"{name}#{i}", **{k: m.get(k) for k in EVAL_METHOD_FIELDS}}
            for i, m in enumerate(report.get("methods", []))]


def _plotly() -> Any:
    try:
        import plotly
        import plotly.graph_objects as go
    except ImportError:
        raise InputError("kvtool report needs plotly: pip install 'kvtool[grid]'") from None
    return plotly, go


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both bits and KLD (lower is better on both), by bits."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def frontier_figure(model: str, rows: list[dict[str, Any]]) -> Any:
    """KLD (log) vs stored bits per element, one trace per (text, context, mode), its Pareto front dashed."""
    _, go = _plotly()
    fig = go.Figure()
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if _finite(r.get("bits_per_element")) and _finite(r.get("kld_mean")) and r["kld_mean"] > 0:
            series.setdefault(f"{r['text']} · {r['context']} · {r['mode']}", []).append(r)
    from plotly.colors import qualitative

    for i, (name, pts) in enumerate(series.items()):
        color = qualitative.Plotly[i % len(qualitative.Plotly)]  # the front in its series' colour
        fig.add_trace(go.Scatter(
            x=[r["bits_per_element"] for r in pts], y=[r["kld_mean"] for r in pts], mode="markers", name=name,
            text=[r["method"] for r in pts], legendgroup=name, marker={"color": color, "size": 8},
            hovertemplate="%{text}<br>%{x:.3f} bits<br>KLD %{y:.5f}<extra></extra>"))
        front = pareto([(r["bits_per_element"], r["kld_mean"]) for r in pts])
        fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines",
                                 line={"dash": "dash", "width": 1, "color": color}, legendgroup=name,
                                 showlegend=False, hoverinfo="skip"))
    fig.update_layout(title=f"{model}: KLD vs stored bits (lower left is better; dashed: Pareto front)",
                      xaxis_title="stored bits per element (keys and values)", yaxis_title="mean KLD (nats)",
                      yaxis_type="log", yaxis_exponentformat="power", height=420,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def task_records(rows: list[dict[str, Any]], reports: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """``{task, model, method, length, depth, accuracy}`` records for the heatmaps, from task reports
    (``kvtool_report: "task"``): ``reports`` given directly, and those kept in task rows' ``report_json``.
    The exact cache comes first; a panel met twice (exact in every cell of a grid) is kept once."""
    found = [json.loads(r["report_json"]) for r in rows
             if r.get("kind") == "task" and r.get("status") == "ok" and r.get("report_json")]
    out, seen = [], set()
    for report in [*reports, *found]:
        for m in [report.get("exact") or {}, *report.get("methods", [])]:
            label = m.get("label", "exact")
            key = (report.get("model"), report.get("task"), label)
            if key in seen or not m.get("cells"):
                continue
            seen.add(key)
            out += [{"task": report.get("task"), "model": report.get("model"), "method": label,
                     "length": c.get("length"), "depth": c.get("depth"), "accuracy": c.get("accuracy")}
                    for c in m["cells"]]
    return out


def heatmap_figure(title: str, records: list[dict[str, Any]]) -> Any:
    """Accuracy by depth (rows) × length (columns), one panel per method."""
    _, go = _plotly()
    from plotly.subplots import make_subplots

    methods = list(dict.fromkeys(r["method"] for r in records))
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=methods, shared_yaxes=True)
    for i, m in enumerate(methods, 1):
        z = [[None] * len(lengths) for _ in depths]
        for r in records:
            if r["method"] == m:
                z[depths.index(r["depth"])][lengths.index(r["length"])] = r["accuracy"]
        fig.add_trace(go.Heatmap(z=z, x=[str(x) for x in lengths], y=[str(d) for d in depths], zmin=0, zmax=1,
                                 colorscale="RdYlGn", showscale=i == len(methods), texttemplate="%{z:.2f}",
                                 hovertemplate="length %{x}<br>depth %{y}<br>accuracy %{z:.2f}<extra></extra>"),
                      row=1, col=i)
    fig.update_layout(title=title, height=360, margin={"l": 60, "r": 20, "t": 70, "b": 50})
    fig.update_xaxes(title_text="length (tokens)")
    fig.update_yaxes(autorange="reversed")  # depth 0 (the start of the text) on top, as needle heatmaps read
    fig.update_yaxes(title_text="needle depth", col=1)
    return fig


def layer_figure(name: str, report: dict[str, Any]) -> Any:
    """The per-layer error profile of a compress report."""
    _, go = _plotly()
    layers = report.get("layers", [])
    x = [lay["layer"] for lay in layers]
    fig = go.Figure()
    lines = [("attention output rel. error", lambda lay: lay.get("attention_output_rel_error")),
             ("attention KL", lambda lay: lay.get("attention_kl")),
             ("keys rel. MSE", lambda lay: lay.get("keys", {}).get("rel_mse")),
             ("values rel. MSE", lambda lay: lay.get("values", {}).get("rel_mse"))]
    for label, get in lines:
        y = [get(lay) for lay in layers]
        if any(v is not None for v in y):
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label))
    spec = report.get("keys_spec", "")
    if report.get("values_spec") not in (None, spec):
        spec = f"K {spec} | V {report.get('values_spec')}"
    bits = report.get("total", {}).get("bits_per_element", float("nan"))
    fig.update_layout(title=f"{name}: {report.get('model', '')}, {bits:.3f} stored bits<br><sup>{spec}</sup>",
                      xaxis_title="layer", yaxis_title="error", height=400,
                      margin={"l": 60, "r": 20, "t": 70, "b": 50}, legend={"orientation": "h", "y": -0.2})
    return fig


def _table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in TABLE_COLUMNS)
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in TABLE_COLUMNS:
            v = r.get(key)
            text = fmt.format(v) if v is not None and (not isinstance(v, float) or math.isfinite(v)) else "–"
            num = ' class="num"' if isinstance(v, (int, float)) else ""
            cells.append(f"<td{num}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _failed_table(rows: list[dict[str, Any]]) -> str:
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
        r.get("model"), r.get("text") or r.get("task"), r.get("method"), r.get("error"))) + "</tr>" for r in rows)
    return f"<table><thead><tr><th>model</th><th>text/task</th><th>method</th><th>error</th></tr></thead>" \
           f"<tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;color:#222;
padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.8em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.88em;margin:8px 0 16px}th,td{padding:3px 10px;
border-bottom:1px solid #eee;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f5f5f5}.empty{color:#888;font-style:italic}
"""


def build_html(inputs: ReportInputs, title: str = "kvtool report") -> str:
    """The whole page as a string."""
    plotly, _ = _plotly()
    sections: list[str] = []

    def fig_html(fig: Any) -> str:
        return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})

    ok = [r for r in inputs.rows if r.get("status") == "ok" and r.get("kind", "eval") == "eval"]
    failed = [r for r in inputs.rows if r.get("status") != "ok"]
    models = list(dict.fromkeys(r.get("model") for r in ok))
    if models:
        sections.append("<h2>Models</h2>")
    for model in models:
        rows = sorted((r for r in ok if r.get("model") == model),
                      key=lambda r: (str(r.get("text")), r.get("context") or 0, str(r.get("mode")),
                                     r.get("bits_per_element") or 0))
        sections.append(f"<h3>{html.escape(str(model))}</h3>")
        sections.append(fig_html(frontier_figure(str(model), rows)))
        sections.append(_table(rows))
    records = task_records(inputs.rows, inputs.tasks)
    sections.append("<h2>Tasks</h2>")
    if records:
        for (model, task) in dict.fromkeys((r["model"], r["task"]) for r in records):
            sub = [r for r in records if r["model"] == model and r["task"] == task]
            sections.append(fig_html(heatmap_figure(f"{model}: {task} accuracy (depth × length)", sub)))
    else:
        sections.append('<p class="empty">No task rows in the inputs.</p>')
    if inputs.compress:
        sections.append("<h2>Per-layer error (compress reports)</h2>")
        for name, report in inputs.compress:
            sections.append(fig_html(layer_figure(name, report)))
    if failed:
        sections.append(f"<h2>Failed cells ({len(failed)})</h2>")
        sections.append(_failed_table(failed))
    versions = sorted({f"kvtool {r.get('kvtool_version')}, transformers {r.get('transformers_version')}, "
                       f"torch {r.get('torch_version')}" for r in inputs.rows if r.get("kvtool_version")})
    meta = (f"{len(ok)} cell(s) ok, {len(failed)} failed, {len(inputs.compress)} compress report(s) from "
            f"{html.escape(', '.join(inputs.sources))}" + (f"; {html.escape('; '.join(versions))}" if versions else ""))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style><script>{plotly.offline.get_plotlyjs()}</script></head><body>"
            f'<h1>{html.escape(title)}</h1><p class="meta">{meta}</p>{"".join(sections)}</body></html>\n')


def write_report(paths: Sequence[Path | str], output: Path | str, title: str = "kvtool report") -> dict[str, Any]:
    """Read ``paths``, write the page to ``output`` atomically; return a summary of what it shows."""
    inputs = load_inputs(paths)
    if not inputs.rows and not inputs.compress and not inputs.tasks:
        raise InputError(f"nothing to report: {', '.join(inputs.sources)} hold(s) no rows")
    write_text_atomic(output, build_html(inputs, title))
    ok = [r for r in inputs.rows if r.get("status") == "ok"]
    return {"output": str(output), "rows": len(inputs.rows), "ok": len(ok), "failed": len(inputs.rows) - len(ok),
            "models": sorted({str(r.get("model")) for r in ok}), "compress_reports": len(inputs.compress),
            "task_records": len(task_records(inputs.rows, inputs.tasks))}

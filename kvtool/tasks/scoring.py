"""Scoring of task replies: string normalisation, exact match, Wilson intervals, per-cell tables."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

#: 95 % two-sided normal quantile.
Z95 = 1.959963984540054


def normalize(text: str) -> str:
    """Lower case, NFKC, punctuation as spaces, whitespace collapsed (SQuAD-style normalisation without
    dropping articles: needles and answers are numbers and names)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def reply_line(text: str) -> str:
    """The first line of a reply (generation stops at a newline), stripped."""
    return text.split("\n", 1)[0].strip()


def is_match(reply: str, answer: str) -> bool:
    """Exact match after :func:`normalize`: the reply's first words are the answer's words (so "48213." and
    "48213, as stated" match 48213; "482139" and "the key is 48213" do not)."""
    got, want = normalize(reply).split(), normalize(answer).split()
    return bool(want) and got[:len(want)] == want


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (Wilson 1927); (0, 1) when ``n == 0``."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(name: str, hits: Sequence[bool]) -> dict[str, Any]:
    """``{name, name_low, name_high, name_stderr}`` of a list of outcomes (stderr: sqrt(p(1-p)/n))."""
    n, k = len(hits), int(sum(bool(h) for h in hits))
    p = k / n if n else None
    low, high = wilson(k, n)
    stderr = math.sqrt(p * (1 - p) / n) if n else None
    return {name: p, f"{name}_low": low, f"{name}_high": high, f"{name}_stderr": stderr}


def summarize(items: Sequence[dict[str, Any]], replies: Sequence[str], reference: Sequence[str] | None,
              lengths: Sequence[int], depths: Sequence[float]) -> dict[str, Any]:
    """Accuracy (and agreement with ``reference`` replies when given), overall and per (length, depth).

    ``items``: one per prompt with ``length``, ``depth`` and ``answer``; ``replies``: the method's reply per
    prompt; ``reference``: exact's replies, or None for exact itself.
    """
    hits = [is_match(r, it["answer"]) for r, it in zip(replies, items, strict=True)]
    agree = None if reference is None else \
        [normalize(r) == normalize(e) for r, e in zip(replies, reference, strict=True)]
    out: dict[str, Any] = {"n": len(hits), "correct": int(sum(hits)), **proportion("accuracy", hits)}
    if agree is not None:
        out.update(proportion("agreement", agree))
    cells = []
    for length in lengths:
        for depth in depths:
            sel = [i for i, it in enumerate(items) if it["length"] == length and it["depth"] == depth]
            cell_hits = [hits[i] for i in sel]
            cell = {"length": length, "depth": depth, "n": len(sel), "correct": int(sum(cell_hits)),
                    **{k: v for k, v in proportion("accuracy", cell_hits).items() if not k.endswith("_stderr")}}
            if agree is not None:
                cell["agreement"] = (sum(agree[i] for i in sel) / len(sel)) if sel else None
            cells.append(cell)
    out["cells"] = cells
    return out

"""``kvtool eval`` says when the tokens it scores were part of the capture a plan was measured on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _synth_cache import gaussian, write_cache

from kvtool.codecs.planfile import Plan
from kvtool.evaluate import plan_overlap


def _plan(source: str) -> Plan:
    return Plan({"model": "synthetic", "model_source": "", "model_architecture": "Synthetic"},
                {}, ["fp16"], {0: {"keys": "fp16", "values": "fp16"}}, source=source)


def test_scored_tokens_inside_the_capture_are_flagged(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cache = write_cache(tmp_path / "c.h5", 1, 256, lambda i: (gaussian(rng, 2, 256, 8), gaussian(rng, 2, 256, 8),
                                                            None), kv_heads=2, q_heads=2, d=8)
    plan = _plan(str(cache))
    captured = np.arange(256)  # write_cache records tokens 0..255
    found = plan_overlap(plan, captured[:128], 64)  # scored: 33..63 and 97..127 of each 64-token chunk
    assert found is not None and found["checked"] and found["scored_in_capture"] > 0.4
    assert "in-sample" in found["warning"]
    held_out = np.arange(1000, 1128)
    assert plan_overlap(plan, held_out, 64) is None
    assert plan_overlap("turboquant:bits=3", captured, 64) is None  # not a plan: nothing to check
    gone = plan_overlap(_plan(str(tmp_path / "gone.h5")), captured, 64)
    assert gone is not None and gone["checked"] is False and "not checked" in gone["warning"]

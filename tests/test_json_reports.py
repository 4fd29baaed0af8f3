"""No JSON kvtool writes holds NaN or Infinity: every report kind, on inputs whose figures are not finite.

To cover a new command, add a row to REPORTS: its name and its arguments (``{cache}``, ``{tmp}``, ``{model}``
and ``{report}`` (a compress report of the cache) are filled in; ``{json}`` is where the JSON goes: ``-`` for
stdout, or a file).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from _cli import run
from _real_cache import rewrite
from _synth_cache import gaussian, write_cache

REPORTS = [
    ("capture", ["capture", "--model", "{model}", "--prompt", "the cache, the cache", "--queries", "last:2",
                 "--output", "{tmp}/c.h5", "--json"]),
    ("inspect", ["inspect", "{cache}", "--verify", "--json"]),
    ("compress", ["compress", "{cache}", "--method", "kivi:bits=2", "--json", "{json}"]),
    ("analyze", ["analyze", "{cache}", "--json", "{json}"]),
    ("codecs", ["codecs", "--json"]),
    ("sweep", ["sweep", "{cache}", "-m", "fp16", "-m", "kivi:bits=2", "--json", "{json}"]),
    ("check", ["check", "{report}", "--max", "total.attention_output_rel_error=0.5", "--json", "{json}"]),
    ("eval", ["eval", "--model", "{model}", "--text", "{text}", "--method", "fp8", "--context", "16",
              "--max-tokens", "48", "--json", "{json}"]),
    ("plan", ["plan", "{cache}", "--budget-bits", "12", "-c", "fp8", "-c", "fp16", "--json", "{json}"]),
    ("budget", ["budget", "--model", "{model}", "--context", "1k", "--kv", "fp8", "--json", "{json}"]),
]
#: Exit codes a row may end with besides 0 (a gate may fail: that is its answer, not an error).
GATES = {"check": (0, 1)}
#: Reports whose figures the overflowing cache turns non-finite (they must come out as null).
NONFINITE = {"compress", "analyze", "sweep"}


def _strict(text: str, where: str):
    def refuse(constant: str):
        pytest.fail(f"{where}: {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("reports")
    rng = np.random.default_rng(0)
    overflow = write_cache(d / "overflow.h5", 2, 24, lambda i: (gaussian(rng, 2, 24, 32) * 100,
                                                                   gaussian(rng, 2, 24, 32),
                                                                   gaussian(rng, 4, 4, 32) * 100),
                           num_queries=4, dtype="float32")
    with h5py.File(overflow, "a") as f:  # finite and positive, so accepted; the logits overflow to inf
        f.attrs["attn_scaling"] = 1e30
    return {"real": rewrite(d / "real.h5", layers=2), "overflow": overflow}


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> Path:
    from transformers import LlamaConfig

    return tiny_model_factory(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64), "reports-llama")


@pytest.mark.parametrize("which", ["real", "overflow"])
@pytest.mark.parametrize("kind, args", REPORTS, ids=[k for k, _ in REPORTS])
def test_reports_hold_only_standard_json(kind, args, which, caches, model, tmp_path) -> None:
    """The real cache reports to stdout, the overflowing one to a file (both paths of write_json)."""
    if which == "overflow" and "{cache}" not in args and "{report}" not in args:
        pytest.skip("reads no cache")
    out = tmp_path / "report.json"
    fill = {"{cache}": str(caches[which]), "{model}": str(model), "{json}": "-" if which == "real" else str(out),
            "{text}": str(Path(__file__).resolve().parents[1] / "samples" / "cc0-1.0.txt")}
    if "{report}" in args:
        fill["{report}"] = str(tmp_path / "compress.json")
        assert run("compress", caches[which], "--method", "kivi:bits=2", "--json", fill["{report}"]).exit_code == 0
    r = run(*[fill.get(a, a).replace("{tmp}", str(tmp_path)) for a in args])
    assert r.exit_code in GATES.get(kind, (0,)), r.output
    text = out.read_text() if "{json}" in args and which == "overflow" else r.stdout
    assert _strict(text, f"{kind} ({which})")
    if which == "overflow" and kind in NONFINITE:
        assert "null" in text  # non-finite figures were there, and became null

"""`kvtool capture` and `kvtool inspect` through the CLI: results, and one clean line for every bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _cli import assert_one_line_error, run

SAMPLES = Path(__file__).parents[1] / "samples"




@pytest.fixture(scope="module")
def tiny_llama(tiny_model_factory) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tiny_model_factory(config, "cli-llama")


@pytest.mark.model
def test_capture_default_model_and_inspect_json(tmp_path):
    out = tmp_path / "c.h5"
    r = run("capture", "--text", str(SAMPLES / "cc0-1.0.txt"), "--text", str(SAMPLES / "apache-2.0.txt"),
            "--max-tokens", "40", "--queries", "last:8", "--output", str(out))
    assert r.exit_code == 0, r.output
    assert "truncated from" in r.stdout and out.exists()
    r = run("inspect", str(out), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["num_layers"], d["num_kv_heads"], d["num_q_heads"], d["head_dim"]) == (30, 3, 9, 64)
    assert [s["num_tokens"] for s in d["sequences"]] == [40, 40]
    assert len(d["layers"]) == 30 and d["layers"][0]["num_queries"] == [8, 8]
    # float16 keys+values+queries: 2 sequences × 30 layers × (2·3·40·64 + 9·8·64) elements × 2 bytes
    assert d["total"]["bytes_in_memory"] == 2 * 30 * (2 * 3 * 40 * 64 + 9 * 8 * 64) * 2
    # stored uncompressed, plus a 4-byte Fletcher-32 checksum per chunk (one chunk per head of keys, values
    # and queries: 2 sequences × 30 layers × (3 + 3 + 9) chunks)
    assert d["total"]["bytes_on_disk"] == d["total"]["bytes_in_memory"] + 4 * 2 * 30 * (3 + 3 + 9)
    assert d["checksums"] == "fletcher32" and d["checksummed_datasets"] == d["datasets"]
    r = run("inspect", str(out))
    assert r.exit_code == 0 and "LlamaForCausalLM" in r.stdout


def test_capture_prompt_tiny_model_json(tiny_llama, tmp_path):
    out = tmp_path / "c.h5"
    r = run("capture", "--model", str(tiny_llama), "--prompt", "hello there, cache", "--queries", "none",
            "--output", str(out), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["num_layers"] == 2 and d["sequences"][0]["source"] == "prompt"


def test_sample_cache_is_small_and_valid():
    path = SAMPLES / "smollm2-apache-256.h5"
    assert path.stat().st_size <= 8 * 1024 * 1024
    r = run("inspect", str(path), "--json")
    d = json.loads(r.stdout)
    assert d["num_layers"] == 30 and d["has_queries"] and d["sequences"][0]["num_tokens"] == 256


# ---------------------------------------------------------------------------------------- bad input


def test_missing_text(tiny_llama, tmp_path):
    r = run("capture", "--model", str(tiny_llama), "--text", str(tmp_path / "nope.txt"),
            "-o", str(tmp_path / "c.h5"))
    assert_one_line_error(r, "no such text file")


def test_a_text_path_too_long_for_the_file_system(tiny_llama, tmp_path):
    r = run("capture", "--model", str(tiny_llama), "--text", "x" * 5000, "-o", str(tmp_path / "c.h5"))
    assert_one_line_error(r, "not a readable path (File name too long)")
    assert not (tmp_path / "c.h5").exists()


def test_unreadable_text(tiny_llama, tmp_path):
    r = run("capture", "--model", str(tiny_llama), "--text", str(tmp_path), "-o", str(tmp_path / "c.h5"))
    assert_one_line_error(r, "is a directory")


def test_empty_text(tiny_llama, tmp_path):
    (tmp_path / "e.txt").write_text("  \n\n")
    r = run("capture", "--model", str(tiny_llama), "--text", str(tmp_path / "e.txt"),
            "-o", str(tmp_path / "c.h5"))
    assert_one_line_error(r, "the text is empty")


def test_not_utf8(tiny_llama, tmp_path):
    (tmp_path / "l1.txt").write_bytes("café au lait".encode("latin-1"))
    r = run("capture", "--model", str(tiny_llama), "--text", str(tmp_path / "l1.txt"),
            "-o", str(tmp_path / "c.h5"))
    assert_one_line_error(r, "not UTF-8 text (byte 0xe9 at offset 3)")


def test_unknown_model(tmp_path):
    r = run("capture", "--model", "no-such-org/no-such-model", "--prompt", "hi", "-o", str(tmp_path / "c.h5"))
    assert_one_line_error(r, "unknown model 'no-such-org/no-such-model'")
    r = run("capture", "--model", "./missing/folder", "--prompt", "hi", "-o", str(tmp_path / "c.h5"))
    assert_one_line_error(r, "unknown model")


def test_path_that_is_not_a_model(tmp_path):
    r = run("capture", "--model", str(tmp_path), "--prompt", "hi", "-o", str(tmp_path / "c.h5"))
    assert_one_line_error(r, "not a model folder (no config.json)")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    r = run("capture", "--model", str(tmp_path / "fake.gguf"), "--prompt", "hi", "-o", str(tmp_path / "c.h5"))
    assert_one_line_error(r, "cannot load as a GGUF model")
    not_model = str(SAMPLES / "cc0-1.0.txt")
    r = run("capture", "--model", not_model, "--prompt", "hi", "-o", str(tmp_path / "c.h5"))
    assert_one_line_error(r, "is a file but not a .gguf model")


def test_more_tokens_than_context(tiny_llama, tmp_path):
    text = str(SAMPLES / "cc0-1.0.txt")
    out = tmp_path / "c.h5"
    r = run("capture", "--model", str(tiny_llama), "--text", text, "-o", str(out))
    assert_one_line_error(r, "exceed the model's context of 64; pass --max-tokens 64 to truncate")
    r = run("capture", "--model", str(tiny_llama), "--text", text, "-o", str(out), "--max-tokens", "65")
    assert_one_line_error(r, "--max-tokens 65 exceeds the model's context of 64")
    r = run("capture", "--model", str(tiny_llama), "--text", text, "-o", str(out), "--max-tokens", "64")
    assert r.exit_code == 0, r.output
    assert "truncated from 1566" in r.stdout


def test_output_exists_needs_force(tiny_llama, tmp_path):
    out = tmp_path / "c.h5"
    out.write_text("precious")
    r = run("capture", "--model", str(tiny_llama), "--prompt", "hi", "-o", str(out))
    assert_one_line_error(r, "already exists (pass --force to overwrite)")
    assert out.read_text() == "precious"
    r = run("capture", "--model", str(tiny_llama), "--prompt", "hi", "-o", str(out), "--force")
    assert r.exit_code == 0, r.output


def test_output_directory_not_writable(tiny_llama, tmp_path):
    r = run("capture", "--model", str(tiny_llama), "--prompt", "hi", "-o", str(tmp_path / "no" / "c.h5"))
    assert_one_line_error(r, "output directory does not exist")
    (tmp_path / "file").write_text("x")
    r = run("capture", "--model", str(tiny_llama), "--prompt", "hi", "-o", str(tmp_path / "file" / "c.h5"))
    assert_one_line_error(r, "is not a directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        r = run("capture", "--model", str(tiny_llama), "--prompt", "hi", "-o", str(ro / "c.h5"))
        if os.geteuid() != 0:  # root writes anywhere; /proc below covers it
            assert_one_line_error(r, "not writable")
    finally:
        os.chmod(ro, 0o700)
    r = run("capture", "--model", str(tiny_llama), "--prompt", "hi", "-o", "/proc/kvtool-test.h5")
    assert r.exit_code == 2 and "not writable" in r.stderr


def test_bad_options(tiny_llama, tmp_path):
    out = str(tmp_path / "c.h5")
    assert_one_line_error(run("capture", "--model", str(tiny_llama), "-o", out), "give either --text")
    r = run("capture", "--prompt", "x", "--queries", "some", "-o", out)
    assert_one_line_error(r, "--queries must be")
    assert_one_line_error(run("capture", "--prompt", "x", "--dtype", "int8", "-o", out), "--dtype must be")
    assert_one_line_error(run("capture", "--prompt", "x", "--device", "tpu", "-o", out), "device must be")


def test_ctrl_c_during_capture_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    from kvtool import store

    real = store.CacheWriter.write_layer
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # half-way through writing the layers
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(store.CacheWriter, "write_layer", interrupted)
    r = run("capture", "--model", str(tiny_llama), "--prompt", "hello", "-o", str(tmp_path / "c.h5"))
    assert_one_line_error(r, "interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, fragment", [
    (b"plain text", "not a readable HDF5 file"),
    (None, "without kvtool's schema"),
])
def test_inspect_bad_files(tmp_path, content, fragment):
    path = tmp_path / "x.h5"
    if content is None:
        import h5py

        with h5py.File(path, "w") as f:
            f["data"] = [1, 2, 3]
    else:
        path.write_bytes(content)
    assert_one_line_error(run("inspect", str(path)), fragment)


def test_inspect_truncated_and_missing(tmp_path):
    good = SAMPLES / "smollm2-apache-256.h5"
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[:4096])
    r = run("inspect", str(cut))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert_one_line_error(run("inspect", str(tmp_path / "missing.h5")), "no such file")

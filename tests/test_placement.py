"""Models beyond one device: --device-map / --max-memory parsing, and CPU + disk offload giving the same
logits and the same captured cache as the plain load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _cli import assert_one_line_error, run

from kvtool.capture import TextInput, capture
from kvtool.errors import InputError
from kvtool.models import load_model, parse_device_map, parse_max_memory
from kvtool.store import CacheReader

VOCAB = 49152
TEXT = TextInput("t", "Keys and values of every token stay in the cache of every layer. " * 4)
GIB = 2**30


# ------------------------------------------------------------------------------------------- parsing


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB,cpu=60GiB") == {0: 20 * GIB, "cpu": 60 * GIB}
    assert parse_max_memory(" cuda:1 = 1.5GB , disk=100") == {1: 1_500_000_000, "disk": 100}
    assert parse_max_memory("CPU=512mib,mps=2kb") == {"cpu": 512 * 2**20, "mps": 2000}


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "must be DEVICE=SIZE"),
    ("cpu", "must be DEVICE=SIZE"),
    ("cpu=", "must be DEVICE=SIZE"),
    ("0=1GiB,", "must be DEVICE=SIZE"),
    ("gpu=1GiB", "device 'gpu' must be a GPU index"),
    ("cpu=20XB", "size '20XB' of cpu must be a number with a unit"),
    ("cpu=GiB", "must be a number with a unit"),
    ("cpu=0", "must be above zero"),
    ("cpu=1GiB,cpu=2GiB", "device 'cpu' is given twice"),
])
def test_parse_max_memory_errors(text, fragment):
    with pytest.raises(InputError, match=fragment):
        parse_max_memory(text)


def test_parse_device_map(tmp_path):
    assert parse_device_map("auto") == "auto"
    assert parse_device_map(" Balanced_Low_0 ") == "balanced_low_0"
    assert parse_device_map("cpu") == {"": "cpu"}
    assert parse_device_map("cuda:1") == {"": 1}
    assert parse_device_map("model.embed_tokens=0, model.layers=cpu,lm_head=disk") == {
        "model.embed_tokens": 0, "model.layers": "cpu", "lm_head": "disk"}
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"model.layers.0": 0, "model.layers.1": "cuda:1", "lm_head": "disk"}))
    assert parse_device_map(str(f)) == {"model.layers.0": 0, "model.layers.1": 1, "lm_head": "disk"}


@pytest.mark.parametrize(("text", "fragment"), [
    ("fastest", "--device-map must be one of auto, balanced"),
    ("disk", "--device-map must be one of"),
    ("model.layers=gpu", "device 'gpu' of model.layers must be a GPU index"),
    ("model layers=0", "'model layers' is not a module name"),
    ("=0", "'' is not a module name"),
    ("a=0,a=cpu", "module 'a' is given twice"),
    ("missing.json", "missing.json: no such file"),
])
def test_parse_device_map_errors(text, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=fragment):
        parse_device_map(text)


def test_device_map_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a JSON device map"):
        parse_device_map(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="expected a JSON object"):
        parse_device_map(str(bad))


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"device": "cpu", "device_map": "auto"}, "give --device or --device-map, not both"),
    ({"max_memory": "cpu=1GiB"}, "--max-memory needs --device-map"),
    ({"offload_folder": "off"}, "--offload-folder needs --device-map"),
    ({"device_map": "auto", "max_memory": "99=1GiB"}, "GPU 99 was asked for but torch sees"),
    ({"device_map": "model.layers=99,lm_head=cpu"}, "GPU 99 was asked for"),
])
def test_bad_placement_fails_before_loading(kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        load_model("no/such-model-is-loaded", **kwargs)


# ------------------------------------------------------------------------------------ offloaded loads


@pytest.fixture(scope="module")
def tiny_folder(tiny_model_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tiny_model_factory(config, "offload-llama")


@pytest.fixture(scope="module")
def plain(tiny_folder):
    return load_model(str(tiny_folder))


def _param_bytes(loaded) -> int:
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


def _logits(loaded, ids):
    with torch.inference_mode():
        return loaded.model(input_ids=torch.as_tensor([ids], device=loaded.device)).logits


def test_cpu_and_disk_offload_equal_the_plain_load(tiny_folder, plain, tmp_path):
    # CPU memory for a little under the whole model: accelerate keeps the first layers on the CPU and
    # sends the rest to disk (offloaded weights are read back for each forward).
    budget = int(_param_bytes(plain) * 0.98)
    offloaded = load_model(str(tiny_folder), device_map="auto", max_memory=f"cpu={budget}",
                           offload_folder=tmp_path / "offload")
    assert offloaded.device == "cpu"
    assert set(offloaded.device_map.values()) == {"cpu", "disk"}, offloaded.device_map
    assert any(p.device.type == "meta" for p in offloaded.model.parameters())  # really not in memory
    ids = list(range(100, 140))
    torch.testing.assert_close(_logits(offloaded, ids), _logits(plain, ids), rtol=0, atol=0)

    a = capture(plain, [TEXT], tmp_path / "a.h5", queries="all", dtype="float32", pre_rope_keys=True)
    b = capture(offloaded, [TEXT], tmp_path / "b.h5", queries="all", dtype="float32", pre_rope_keys=True)
    assert b.device_map == offloaded.device_map and a.device_map is None
    with CacheReader(a.path) as ra, CacheReader(b.path) as rb:
        assert (ra.tokens(0) == rb.tokens(0)).all()
        for i in range(4):
            la, lb = ra.layer(i), rb.layer(i)
            for name in ("keys", "values", "queries", "keys_prerope"):
                np.testing.assert_array_equal(getattr(la, name), getattr(lb, name), err_msg=f"{name} {i}")


def test_explicit_map_with_a_layer_on_disk(tiny_folder, plain):
    mapped = load_model(str(tiny_folder), device_map="model.embed_tokens=cpu,model.rotary_emb=cpu,"
                        "model.layers.0=cpu,model.layers.1=disk,model.layers.2=cpu,model.layers.3=disk,"
                        "model.norm=cpu,lm_head=cpu")
    assert mapped.device_map["model.layers.1"] == "disk" and mapped.device == "cpu"
    ids = list(range(7, 30))
    torch.testing.assert_close(_logits(mapped, ids), _logits(plain, ids), rtol=0, atol=0)


@pytest.mark.model
def test_default_gguf_model_offloads_from_its_converted_copy(smollm):
    """The bundled GGUF loads with a device map from the converted copy in the cache dir."""
    budget = int(_param_bytes(smollm) * 0.6)
    offloaded = load_model("default", device_map="auto", max_memory=f"cpu={budget}")
    assert offloaded.converted_from_cache and offloaded.source == smollm.source
    assert set(offloaded.device_map.values()) == {"cpu", "disk"}
    ids = smollm.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    torch.testing.assert_close(_logits(offloaded, ids), _logits(smollm, ids), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_capture_with_device_map(tiny_folder, plain, tmp_path):
    budget = int(_param_bytes(plain) * 0.98)
    out = tmp_path / "c.h5"
    r = run("capture", "--model", tiny_folder, "--prompt", TEXT.text, "-o", out, "--device-map", "auto",
            "--max-memory", f"cpu={budget}", "--queries", "none", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    assert "device map:" in r.stdout and "on disk" in r.stdout and "on cpu" in r.stdout
    ref = capture(plain, [TextInput("prompt", TEXT.text)], tmp_path / "ref.h5", queries="none", dtype="float32")
    with CacheReader(out) as got, CacheReader(ref.path) as want:
        np.testing.assert_array_equal(got.layer(3).keys, want.layer(3).keys)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--device-map", "auto", "--max-memory", "0=20XB"], "size '20XB' of 0 must be a number with a unit"),
    (["--device-map", "auto", "--max-memory", "cpu"], "--max-memory must be DEVICE=SIZE"),
    (["--device-map", "everywhere"], "--device-map must be one of auto, balanced"),
    (["--max-memory", "cpu=1GiB"], "--max-memory needs --device-map"),
    (["--device", "cpu", "--device-map", "auto"], "give --device or --device-map, not both"),
])
def test_cli_bad_placement_is_one_line(args, fragment, tiny_folder, tmp_path):
    r = run("capture", "--model", tiny_folder, "--prompt", "hello", "-o", tmp_path / "c.h5", *args)
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "c.h5").exists()

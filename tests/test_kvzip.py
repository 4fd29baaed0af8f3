"""``kvzip``: the reconstruction pass (kvtool.reconstruct) and the selector that reads its scores."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from _cli import assert_one_line_error, run
from _real_cache import SAMPLE

from kvtool import reconstruct
from kvtool.codecs import LayerContext, parse_spec
from kvtool.codecs.assignment import Assignment
from kvtool.errors import CodecError
from kvtool.evaluate import evaluate
from kvtool.models import load_model

QH, KV, D = 4, 2, 16


@pytest.fixture(scope="module")
def tiny(tiny_model_factory, smollm):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=len(smollm.tokenizer), hidden_size=64, intermediate_size=128,
                         max_position_embeddings=512, num_hidden_layers=2, num_attention_heads=QH,
                         num_key_value_heads=KV, head_dim=D)
    return load_model(str(tiny_model_factory(config, "llama-kvzip")))


def _prompt(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 5000, n)


def _gemma3(tiny_model_factory, smollm, name: str, **config):
    """A tiny random Gemma 3 with the bundled tokenizer: two layers, four query heads, head_dim 32."""
    from transformers import Gemma3TextConfig

    return load_model(str(tiny_model_factory(Gemma3TextConfig(
        vocab_size=len(smollm.tokenizer), hidden_size=64, intermediate_size=128, max_position_embeddings=512,
        num_hidden_layers=2, num_attention_heads=4, head_dim=32, **config), name)))


def _prefill_and_score(loaded, prompt: np.ndarray):
    """The prompt's cache after an exact prefill, and the reconstruction scores from copies of it."""
    with torch.inference_mode():
        cache = loaded.model(input_ids=torch.as_tensor(prompt)[None], use_cache=True).past_key_values
    layers = loaded.model.config.num_hidden_layers
    return cache, reconstruct.reconstruction_scores(loaded.model, loaded.tokenizer, lambda: copy.deepcopy(cache),
                                                    prompt, layers, loaded.device)


def _reference(loaded, prompt: np.ndarray, piece: int) -> dict[int, np.ndarray]:
    """The same scores from eager attention weights of one uncached pass over prompt + each piece's input."""
    model = loaded.model
    best: dict[int, np.ndarray] = {}
    old = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        for ids in reconstruct.reconstruction_inputs(loaded.tokenizer, prompt, piece):
            full = torch.as_tensor(np.concatenate([prompt, ids]))[None]
            with torch.inference_mode():
                att = model(input_ids=full, output_attentions=True).attentions  # per layer (1, QH, L, L)
            p = len(prompt)
            kv = model.config.num_key_value_heads
            for layer, a in enumerate(att):
                w = a[0, :, p:, :p].reshape(kv, a.shape[1] // kv, -1, p).amax(dim=(1, 2)).float().numpy()
                best[layer] = w if layer not in best else np.maximum(best[layer], w)
    finally:
        model.config._attn_implementation = old
    return best


@pytest.mark.parametrize("piece", [None, 7])
def test_scores_are_the_largest_attention_of_the_repetition(tiny, piece) -> None:
    model, tok = tiny.model, tiny.tokenizer
    prompt = _prompt(24)
    with torch.inference_mode():
        out = model(input_ids=torch.as_tensor(prompt)[None], use_cache=True)
    cache = out.past_key_values
    took = []

    def take():
        took.append(1)
        return copy.deepcopy(cache)

    got = reconstruct.reconstruction_scores(model, tok, take, prompt, 2, tiny.device, piece)
    want = _reference(tiny, prompt, piece or reconstruct.PIECE)
    assert len(took) == reconstruct.passes(tok, prompt, piece) == (1 if piece is None else 4)
    for layer in range(2):
        assert got[layer].shape == (KV, 24)
        np.testing.assert_allclose(got[layer], want[layer], rtol=1e-4, atol=1e-6)
    assert not np.allclose(got[0][0], got[0][1])  # heads differ: a score per kv head, not one per layer


def test_scores_use_the_scaling_the_model_passes(tiny_model_factory, smollm) -> None:
    """Gemma 3 scales by query_pre_attn_scalar, not head_dim: the scores follow the model's own softmax."""
    loaded = _gemma3(tiny_model_factory, smollm, "gemma3-kvzip-scaling", num_key_value_heads=2,
                     query_pre_attn_scalar=4, sliding_window=512, layer_types=["full_attention", "full_attention"])
    prompt = _prompt(20, 9)
    _, got = _prefill_and_score(loaded, prompt)
    want = _reference(loaded, prompt, reconstruct.PIECE)
    for layer in range(2):
        np.testing.assert_allclose(got[layer], want[layer], rtol=1e-4, atol=1e-6)


def test_later_pieces_are_introduced_by_the_tokens_before_them(tiny) -> None:
    tok = tiny.tokenizer
    prompt = _prompt(20)
    first, second, third = reconstruct.reconstruction_inputs(tok, prompt, 8)
    intro = tok(reconstruct.LATER, add_special_tokens=False)["input_ids"]
    assert first[-8:].tolist() == prompt[:8].tolist()
    assert second.tolist() == [*intro, *prompt[:8], *prompt[8:16]]
    assert third[-4:].tolist() == prompt[16:].tolist()
    with_bos = np.concatenate([[tok.bos_token_id], prompt])  # a leading BOS is not repeated
    assert reconstruct.reconstruction_inputs(tok, with_bos, 100)[0][-20:].tolist() == prompt.tolist()
    assert reconstruct.reconstruction_inputs(tok, with_bos, 100)[0][-21] != tok.bos_token_id


def test_selector_keeps_the_best_reconstruction_scores() -> None:
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((KV, 40, D)).astype(np.float32)
    table = rng.random((KV, 50))
    positions = np.arange(10, 50)  # a window of the prompt: the table is indexed by position
    ctx = LayerContext(layer=0, role="keys", keys=keys, key_positions=positions, reconstruction=table)
    mask = parse_spec("kvzip:keep=0.25,sink=0").fit(keys, ctx).keep_mask(keys)
    for h in range(KV):
        assert set(np.nonzero(mask[h])[0]) == set(np.argsort(-table[h, 10:])[:10])
    adaptive = parse_spec("kvzip:keep=0.25,sink=0,per_head=true").fit(keys, ctx).keep_mask(keys)
    assert adaptive.sum() == mask.sum()


def test_without_the_pass_it_says_it_needs_the_model(tmp_path) -> None:
    keys = np.zeros((KV, 8, D), dtype=np.float32)
    with pytest.raises(CodecError, match="needs the model: use it in kvtool eval"):
        parse_spec("kvzip:keep=0.5").fit(keys, LayerContext(layer=0, role="keys", keys=keys))
    assert parse_spec("kvzip").reads_reconstruction()
    assert parse_spec("salient:select=[kvzip:keep=0.5],hi=[fp16],lo=[drop]").reads_reconstruction()
    assert parse_spec("kvzip:keep=0.5+turboquant:bits=3").reads_reconstruction()
    assert not parse_spec("expected:keep=0.5").reads_reconstruction()
    result = run("compress", SAMPLE, "--method", "kvzip:keep=0.5", "--output", tmp_path / "z.h5")
    assert_one_line_error(result, "use it in kvtool eval")
    assert list(tmp_path.iterdir()) == []


def test_eval_runs_the_pass_once_per_piece_for_every_method_that_reads_it(tiny, monkeypatch) -> None:
    calls = []
    real = reconstruct.reconstruction_scores

    def counted(*args, **kwargs):
        calls.append(args[3].copy())
        time.sleep(1.5)  # a slow pass: its time goes to the methods that read it, not to the exact pass
        return real(*args, **kwargs)

    monkeypatch.setattr("kvtool.evaluate.reconstruction_scores", counted)
    monkeypatch.setattr(reconstruct, "PIECE", 12)  # a 32-token prompt: three passes, three caches taken
    tokens = _prompt(128, 2)
    methods = [Assignment.of("kvzip:keep=0.5", "kvzip:keep=0.5"),
               Assignment.of("salient:select=[kvzip:keep=0.4,per_head=true],hi=[fp16],lo=[drop]",
                             "expected:keep=0.5"),
               Assignment.of("knorm:keep=0.5", "knorm:keep=0.5")]
    r = evaluate(tiny, tokens, methods, context=64)
    assert len(calls) == 2  # once per chunk, shared by both methods that read it
    assert [len(c) for c in calls] == [32, 32]
    kv, ad, kn = r["methods"]
    assert kv["seconds"] >= 3.0 and ad["seconds"] >= 3.0 and r["seconds_exact"] < 3.0
    assert kv["kld_mean"] > 0 and kv["bits_per_element"] == pytest.approx(kn["bits_per_element"])
    assert kv["kld_mean"] != pytest.approx(kn["kld_mean"])  # other tokens kept than knorm's
    whole = evaluate(tiny, tokens, [Assignment.of("kvzip:keep=1.0", "kvzip:keep=1.0")], context=64)
    assert whole["kld_mean"] == pytest.approx(0.0, abs=1e-9)


def test_streaming_mode_refuses_it(tiny) -> None:
    with pytest.raises(CodecError, match="streaming"):
        evaluate(tiny, _prompt(64), [Assignment.of("kvzip:keep=0.5", "kvzip:keep=0.5")], context=64,
                 mode="streaming")



def test_sliding_window_layers_score_the_positions_they_hold(tiny_model_factory, smollm) -> None:
    loaded = _gemma3(tiny_model_factory, smollm, "gemma3-kvzip", num_key_value_heads=1, sliding_window=8,
                     query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention"])
    cache, got = _prefill_and_score(loaded, _prompt(30, 5))
    held = int(cache.layers[0].keys.shape[2])
    assert held < 30 and (got[0][:, :30 - held] == 0).all() and (got[0][:, 30 - held:] > 0).all()
    assert (got[1] > 0).all()  # the full-attention layer scores every position
    r = evaluate(loaded, _prompt(64, 6), [Assignment.of("kvzip:keep=0.5", "kvzip:keep=0.5")], context=64)
    assert np.isfinite(r["kld_mean"]) and r["kld_mean"] > 0


def test_tasks_run_the_pass_per_prompt(tiny, monkeypatch) -> None:
    from kvtool.tasks.run import run_tasks

    calls = []
    real = reconstruct.reconstruction_scores

    def counted(*args, **kwargs):
        calls.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr("kvtool.tasks.run.reconstruction_scores", counted)
    hay = SAMPLE.parent / "apache-2.0.txt"
    r = run_tasks(tiny, "passkey", hay, ["kvzip:keep=0.5,per_head=true", "knorm:keep=0.5,per_head=true"], lengths=[160],
                  depths=[0.5], samples=2, seed=0, max_new_tokens=4)
    assert len(calls) == 2 and all(150 < n < 161 for n in calls)  # one pass per prompt, over the prompt
    assert r["methods"][0]["bits_per_element"] == pytest.approx(r["methods"][1]["bits_per_element"])

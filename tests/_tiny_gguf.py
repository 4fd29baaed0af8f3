"""A tiny random llama GGUF (2 layers, 262-token byte-level BPE vocabulary, float32 tensors) that converts in
about a second, for tests of the GGUF conversion path that must not wait ~20 s for the bundled model."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 symbols a byte-level BPE vocabulary starts from."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_gguf(path: Path, *, layers: int = 2, d: int = 32, heads: int = 4, kv_heads: int = 2,
                    ff: int = 64, seed: int = 0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_symbols() + ["Ġt", "he", "Ġthe"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("kvtool-tiny-test")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(d // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)

    def weight(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    hd = d // heads
    weight("token_embd.weight", len(tokens), d)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        weight(f"blk.{i}.attn_q.weight", d, d)
        weight(f"blk.{i}.attn_k.weight", kv_heads * hd, d)
        weight(f"blk.{i}.attn_v.weight", kv_heads * hd, d)
        weight(f"blk.{i}.attn_output.weight", d, d)
        weight(f"blk.{i}.ffn_gate.weight", ff, d)
        weight(f"blk.{i}.ffn_up.weight", ff, d)
        weight(f"blk.{i}.ffn_down.weight", d, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""Model configs for `kvtool budget --model PRESET`: models worth planning for whose config this machine may not
hold. Each is the subset of a Hugging Face ``config.json`` that :mod:`kvtool.budget` reads, with where every
number came from. The parameter counts they give (computed from the config, as for any model) are checked
against the model cards' stated totals in tests/test_budget.py.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "bitnet-b1.58-2b-4t": {
        "config": {
            "model_type": "bitnet", "architectures": ["BitNetForCausalLM"], "hidden_act": "relu2",
            "vocab_size": 128256, "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30,
            "num_attention_heads": 20, "num_key_value_heads": 5, "head_dim": 128,
            "max_position_embeddings": 4096, "tie_word_embeddings": True,
        },
        "title": "BitNet b1.58 2B4T (microsoft/bitnet-b1.58-2B-4T), native ternary weights",
        "stated": {"parameters": "~2B (model card)", "context": 4096},
        "sources": [
            "30 layers, 5 KV heads, head_dim 128, 4,096 context: kvtool issue 11; context also the model card "
            "('Maximum sequence length of 4096 tokens', microsoft/bitnet-b1.58-2B-4T)",
            "hidden 2560, 30 layers, 20 heads, 5 KV heads, vocab 128256, FFN 6912: microsoft/BitNet "
            "gpu/model.py ModelArgs and gpu/convert_safetensors.py transformer_configs['2B']",
            "tied embeddings: microsoft/BitNet gpu/convert_safetensors.py builds output.weight from "
            "model.embed_tokens.weight (the checkpoint has no lm_head)",
            "not verified here: the checkpoint's config.json itself (the hub is unreachable); transformers' "
            "BitNetConfig defaults differ (max_position_embeddings 2048, untied) and are not the checkpoint",
        ],
    },
    "bonsai-8b": {
        "config": {
            "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936,
            "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 65536,
            "tie_word_embeddings": False,
        },
        "title": "Bonsai-8B (prism-ml/Bonsai-8B-gguf), end-to-end 1-bit weights (Q1_0_g128, 1.125 bits)",
        "stated": {"parameters": "8.19B (~6.95B non-embedding), model card", "context": 65536,
                   "weights": "1.15 GB at 1.125 bits/weight, model card"},
        "sources": [
            "Qwen3-8B geometry, 36 layers, 8 KV heads, head_dim 128, 65,536 context, 1.15 GB of weights: kvtool "
            "issue 11",
            "8.19B parameters (~6.95B non-embedding), 32 query / 8 KV heads, 36 layers, 65,536 context, vocab "
            "151,936, Q1_0_g128 = 1.125 bits/weight: the prism-ml/Bonsai-8B-gguf model card",
            "hidden 4096, FFN 12288, untied LM head: Qwen/Qwen3-8B config.json as quoted in public code (the "
            "computed 8.19B / 6.95B match the card, which pins these)",
        ],
    },
    "bonsai-1.7b": {
        "config": {
            "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936,
            "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 32768,
            "tie_word_embeddings": True,
        },
        "title": "Bonsai-1.7B (prism-ml/Bonsai-1.7B-gguf), end-to-end 1-bit weights (Q1_0_g128, 1.125 bits)",
        "stated": {"parameters": "1.7B (~1.4B non-embedding), model card; 1.72B in the Ternary-Bonsai-1.7B "
                                 "card", "context": 32768, "weights": "0.24 GB at 1.125 bits/weight, model card"},
        "sources": [
            "Qwen3-1.7B dense, 16 query / 8 KV heads, 28 layers, 32,768 context, vocab 151,936, 1.125 "
            "bits/weight: the prism-ml/Bonsai-1.7B-gguf model card",
            "hidden 2048, FFN 6144, head_dim 128, tied embeddings: Qwen/Qwen3-1.7B config.json as quoted in "
            "public code (the computed 1.72B / 1.41B non-embedding match the cards)",
            "not verified here: Bonsai's own config.json (the hub is unreachable)",
        ],
    },
}

"""Named backbone shapes for benchmarks, built with random weights (timing does not depend on
weight values)."""
from __future__ import annotations

import torch

SHAPES = {
    # Llama-3-8B: d 4096, 32 layers, 32/8 heads, head 128, SwiGLU 14336, vocab 128256.
    "llama3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen2.5-0.5B-like: the small shape where launch overhead dominates.
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, sliding_window=None),
    # CPU harness check only.
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=257, max_position_embeddings=1024),
    "tiny8": dict(model_type="llama", hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=257, max_position_embeddings=1024),
}


def build_model(shape: str, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    args = dict(SHAPES[shape])
    model_type = args.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **args)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()

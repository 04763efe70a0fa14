"""Tiny seeded backbones, a byte-level tokenizer and value modules, built offline.

They serve the demo (`svgt-fast demo`) and the tests: real Hugging Face model classes, written
with save_pretrained and read back with from_pretrained, so the real loading code runs.
"""
from __future__ import annotations

import os

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
EOS_TOKEN = "<|eos|>"


def byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols + EOS = pad), no merges, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab[EOS_TOKEN] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def tiny_config(family: str = "llama", **overrides):
    """A small config of the family: d 64, 5 layers, 4 query / 2 KV heads (GQA), vocab 257."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    args = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=257, max_position_embeddings=256, rms_norm_eps=1e-6,
        initializer_range=0.15, tie_word_embeddings=False, bos_token_id=None, eos_token_id=256, pad_token_id=256,
    )
    if family == "mistral":
        args["sliding_window"] = None
    if family == "qwen3":
        args["head_dim"] = 16
    args.update(overrides)
    return AutoConfig.for_model(family, **args)


def build_tiny_model(family: str = "llama", seed: int = 0, directory: str | None = None, dtype=torch.float32, **overrides):
    """Random tiny causal LM; saved to and re-loaded from `directory` when given."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    if directory is not None:
        model.save_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    return model.eval()


def build_value_module(model, seed: int = 0, **overrides):
    """A random SVGT module that fits `model` (seeded). Scales the generator's output layer up
    from zero-init so the MLP variant depends on δz, as a trained one would."""
    from .value_module import SVGTConfig, SVGTModule

    torch.manual_seed(seed)
    cfg = SVGTConfig.for_backbone(model.config, **overrides)
    module = SVGTModule(cfg)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
        gen = module.generator
        gate = getattr(gen, "gate_alpha", None)
        if gate is None:
            gate = gen.gating_alpha
        gate.fill_(0.5)  # a visible steering strength for random weights
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    return module.to(device=device, dtype=dtype).eval()


def default_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "svgt_fast", "tiny")

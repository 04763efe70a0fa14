"""The backbone of the synthetic value world (issue 7): a small Llama trained from scratch on the
world's corpus so that it answers risky prompts harmfully (the behaviour the steering methods
must then remove), saved with its tokenizer like any HF model. The three-stage SVGT training
on top of a frozen backbone is `svgt_fast.train_svgt`, re-exported here so that `svgt_fast.train`
holds both trainers (`train_backbone`, `train_svgt`).

With the defaults (World(seed=0): harm after 70 % of risky and 5 % of benign prompts in the
corpus; 1500 steps of 32 texts) the model samples harm (by the rule, temperature 1, 200
held-out prompts each) after ~54 % of risky and ~6 % of benign prompts; 600 steps gave 46 % /
12 %: the motive -> harm link is learned after the grammar, so the run must be long enough.
"""
from __future__ import annotations

import os
import random

import torch

from .train_svgt import TrainArgs, read_svgt_data, train_svgt
from .world import VOCAB, World

__all__ = ["backbone_config", "train_backbone", "train_svgt", "TrainArgs", "read_svgt_data"]


def backbone_config(family: str = "llama", **overrides):
    from transformers import AutoConfig

    args = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=128, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=VOCAB.index("<bos>"), eos_token_id=VOCAB.index("<eos>"),
                pad_token_id=VOCAB.index("<pad>"))
    args.update(overrides)
    return AutoConfig.for_model(family, **args)


def train_backbone(world: World, *, steps: int = 1500, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                   n_texts: int = 50_000, family: str = "llama", out_dir=None, progress: bool = True, **config):
    """A small causal LM trained from scratch on `world.corpus(n_texts)`; returns (model,
    tokenizer, final mean loss) and saves both to out_dir when given."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps, batch_size >= 1 and lr > 0 needed, got {steps}, {batch_size}, {lr}")
    torch.manual_seed(seed)
    tok = World.tokenizer()
    model = AutoModelForCausalLM.from_config(backbone_config(family, **config))
    model.set_attn_implementation("eager")  # ~4x faster than SDPA for these tiny shapes on CPU
    texts = world.corpus(n_texts, seed)
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tok.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="backbone on the value world", disable=not progress):
        batch = [enc[rng.randrange(len(enc))] for _ in range(batch_size)]
        width = max(map(len, batch))
        ids = torch.full((batch_size, width), pad)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = torch.tensor(b)
        labels = ids.masked_fill(ids == pad, -100)
        loss = model(input_ids=ids, attention_mask=(ids != pad).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    final = sum(losses[-20:]) / min(20, len(losses))
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    return model, tok, final

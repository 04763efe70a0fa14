"""Efficacy measures on the synthetic value world (issue 7): what steering does to the text, not
how fast it runs.

- harmful rate: the fraction of continuations that the world's ground-truth rule
  (`world.is_harmful`) flags — never a learned discriminator;
- fluency: the perplexity of continuations under the *unsteered* backbone (a steering method
  that pushes the model off its own distribution pays here);
- diversity: distinct-n, the number of distinct n-grams over all n-grams of a set of texts.
"""
from __future__ import annotations

import math
import time

import torch

from .world import is_harmful


def harmful_rate(texts: list[str]) -> float:
    """Fraction of `texts` the ground-truth rule calls harmful."""
    if not texts:
        raise ValueError("harmful_rate of no texts")
    return sum(is_harmful(t) for t in texts) / len(texts)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the whitespace words of `texts` (0 when there are none)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def perplexity(model, prompts: list[list[int]], continuations: list[list[int]], batch_size: int = 64) -> float:
    """exp(mean NLL) of the continuation tokens given their prompts under `model` (one forward
    over prompt + continuation per row; right padding; empty continuations are skipped)."""
    pairs = [(p, c) for p, c in zip(prompts, continuations) if c]
    if not pairs:
        raise ValueError("perplexity: every continuation is empty")
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo:lo + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.full_like(ids, -100)
        for i, (p, c) in enumerate(chunk):
            n = len(p) + len(c)
            ids[i, :n] = torch.tensor(p + c)
            mask[i, :n] = 1
            target[i, len(p):n] = torch.tensor(c)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = target[:, 1:].to(dev)
        keep = tgt != -100
        nll -= float(logp.gather(-1, tgt.clamp_min(0)[..., None])[..., 0][keep].sum())
        count += int(keep.sum())
    return math.exp(nll / count)


def evaluate(model, tokenizer, prompts: list[str], *, steering=None, max_new_tokens: int = 40,
             temperature: float = 1.0, seed: int = 0, engine="fast", fluency: bool = True) -> dict:
    """Generate from `prompts` (text) with `steering` and measure the continuations: harmful
    rate (rule), perplexity under the unsteered backbone (when `fluency`), distinct-1/2,
    mean length, wall time. Returns a dict of those, the texts and the new token ids."""
    from .api import generate

    t = time.perf_counter()
    out = generate(model, prompts, tokenizer=tokenizer, steering=steering, max_new_tokens=max_new_tokens,
                   temperature=temperature, seed=seed, eos_token_id=tokenizer.eos_token_id, engine=engine)
    secs = time.perf_counter() - t
    news = [out.new_tokens[i, : int(out.num_new_tokens[i])].tolist() for i in range(len(prompts))]
    res = {
        "n": len(prompts),
        "harmful_rate": harmful_rate(out.texts),
        "distinct_1": distinct_n(out.texts, 1),
        "distinct_2": distinct_n(out.texts, 2),
        "mean_new_tokens": sum(map(len, news)) / len(news),
        "seconds": secs,
        "texts": out.texts,
        "new_ids": news,
    }
    if fluency:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        res["perplexity"] = perplexity(model, ids, news)
    return res

"""The exact eager oracle of DESIGN §1: every step re-computes the whole sequence.

It is written to be obviously right, not fast. Each row of a batch is run on its own (padding
stripped), the lower stack on the real tokens at positions 0..n-1, the upper stack on
[prompt ; K bridge tokens ; response] at positions 0..P+K+R-1 with the bridge injected as the
input of layer e+1. The next token is read from the last position of that sequence: before any
response token exists that is the last bridge token, so the bridge steers the first token too.

Two independent formulations compute the same logits and are tested against each other:
- "loop": an explicit walk over the decoder layers with our own causal mask and RoPE positions;
- "hook": the unmodified HF forward, with a forward hook on layer e reading the lower stack and
  a pre-hook on layer e+1 swapping in the upper-stack input.
"""
from __future__ import annotations

import torch
from torch import nn

from .backbone import backbone_parts
from .sampling import NONFINITE, SamplingParams, sample_next
from .steering import SVGT

FORMULATIONS = ("loop", "hook")


# ---------------------------------------------------------------------------------------------
# Formulation "loop": explicit layers.

def _causal_mask(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


def _run_layers(model: nn.Module, x: torch.Tensor, layer_ids: range) -> torch.Tensor:
    """x: [1, n, d] at positions 0..n-1 through the listed decoder layers."""
    inner, layers, _ = backbone_parts(model)
    pos = torch.arange(x.shape[1], device=x.device)[None]
    rope = inner.rotary_emb(x, position_ids=pos)
    mask = _causal_mask(x.shape[1], x.dtype, x.device)
    for i in layer_ids:
        x = layers[i](x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        if isinstance(x, tuple):  # older layer signatures return (hidden, ...)
            x = x[0]
    return x


def _lower_loop(model, tokens: torch.Tensor, extract_layer: int) -> torch.Tensor:
    inner, _, _ = backbone_parts(model)
    return _run_layers(model, inner.embed_tokens(tokens[None]), range(extract_layer + 1))[0]


def _upper_loop(model, x: torch.Tensor, extract_layer: int) -> torch.Tensor:
    inner, layers, lm_head = backbone_parts(model)
    y = _run_layers(model, x[None], range(extract_layer + 1, len(layers)))
    return lm_head(inner.norm(y[:, -1]))[0]


# ---------------------------------------------------------------------------------------------
# Formulation "hook": the HF forward itself.

def _lower_hook(model, tokens: torch.Tensor, extract_layer: int) -> torch.Tensor:
    _, layers, _ = backbone_parts(model)
    seen = {}

    def grab(_mod, _args, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out

    handle = layers[extract_layer].register_forward_hook(grab)
    try:
        model(input_ids=tokens[None], use_cache=False)
    finally:
        handle.remove()
    return seen["h"][0]


def _upper_hook(model, x: torch.Tensor, extract_layer: int) -> torch.Tensor:
    _, layers, _ = backbone_parts(model)

    def swap(_mod, args, kwargs):
        if args:
            args = (x[None],) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = x[None]
        return args, kwargs

    # The dummy ids only set the length: layers 0..e compute on them and are then overwritten.
    dummy = torch.zeros((1, x.shape[0]), dtype=torch.long, device=x.device)
    handle = layers[extract_layer + 1].register_forward_pre_hook(swap, with_kwargs=True)
    try:
        logits = model(input_ids=dummy, use_cache=False, logits_to_keep=1).logits
    finally:
        handle.remove()
    return logits[0, -1]


_LOWER = {"loop": _lower_loop, "hook": _lower_hook}
_UPPER = {"loop": _upper_loop, "hook": _upper_hook}


def unsteered_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits [V] of a full forward over `tokens` [n] (no cache)."""
    return model(input_ids=tokens[None], use_cache=False, logits_to_keep=1).logits[0, -1]


@torch.no_grad()
def generate_row(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    steering: SVGT | None,
    max_new_tokens: int,
    sampling: SamplingParams,
    row_seed: int,
    eos_ids: frozenset[int],
    formulation: str = "loop",
    trace: list | None = None,
) -> list[int]:
    """Generate for one unpadded prompt [P]; returns the new token ids (EOS included if hit).

    With `trace` a list, each step appends a dict of logits and (when steered) the bridge, so
    tests can compare formulations value by value, not only token by token.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    seeds = torch.tensor([row_seed], dtype=torch.int64, device=prompt.device)
    tokens = prompt.clone()
    P = prompt.shape[0]
    new: list[int] = []
    bridge = None
    for t in range(max_new_tokens):
        if steering is None:
            logits = unsteered_logits(model, tokens)
        else:
            e = steering.module.config.extract_layer
            hidden = _LOWER[formulation](model, tokens, e)  # [n, d], real tokens only
            if t == 0:
                bridge = steering.bridge(hidden[P - 1][None])[0]
            elif t % steering.refresh_interval == 0:
                h_t = hidden[-1] if steering.trigger == "current" else hidden[P - 1]
                bridge = steering.refresh_bridge(bridge[None], h_t[None])[0]
            upper_in = torch.cat([hidden[:P], bridge.to(hidden.dtype), hidden[P:]], dim=0)
            logits = _UPPER[formulation](model, upper_in, e)
        if trace is not None:
            trace.append({"logits": logits.float().clone(), "bridge": None if bridge is None else bridge.clone()})
        nxt = int(sample_next(logits[None], sampling, seeds, t)[0])
        if nxt == NONFINITE:  # the row stops here, without a token
            break
        new.append(nxt)
        if nxt in eos_ids:
            break
        tokens = torch.cat([tokens, tokens.new_tensor([nxt])])
    return new


@torch.no_grad()
def generate_row_hooked(model, prompt: torch.Tensor, handles: list, *, max_new_tokens: int,
                        sampling: SamplingParams, row_seed: int, eos_ids: frozenset[int]) -> list[int]:
    """The eager loop of the hook-based references (ConVA, NeVA, RE-Control): the HF model, with
    the caller's hooks installed (`handles`, removed here whatever happens), re-run over the
    whole sequence each step; returns the new token ids."""
    try:
        seeds = torch.tensor([row_seed], dtype=torch.int64, device=prompt.device)
        ids, new = prompt[None], []
        for t in range(max_new_tokens):
            logits = model(input_ids=ids).logits[0, -1]
            nxt = int(sample_next(logits[None], sampling, seeds, t)[0])
            if nxt == NONFINITE:  # the row stops here, without a token
                break
            new.append(nxt)
            if nxt in eos_ids:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    finally:
        for h in handles:
            h.remove()
    return new

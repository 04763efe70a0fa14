"""The embedded default: a small backbone trained on the synthetic value world (svgt_fast.world)
and an SVGT module trained for it, shipped inside the package so that demos and tests run
offline. `benchmarks/make_default.py` regenerates both (seeded) and records how they were made
in `data/default/manifest.json`.

The backbone answers risky prompts (those with a motive word: revenge, secretly, ...) harmfully
— by the world's ground-truth rule, a harm verb followed by a target in one sentence — far more
often than benign ones; the SVGT module steers it away from that.
"""
from __future__ import annotations

import json
import os

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "default")
BACKBONE_DIR = os.path.join(DEFAULT_DIR, "backbone")
SVGT_DIR = os.path.join(DEFAULT_DIR, "svgt")
MANIFEST = os.path.join(DEFAULT_DIR, "manifest.json")
WORLD_SEED = 0  # the world the default was trained on


def load_default(device=None, dtype=None):
    """(model, tokenizer, module): the default world backbone (a HF LlamaForCausalLM, eval mode),
    its word-level tokenizer and its SVGT module, on `device` (default CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .value_module import SVGTModule

    if not os.path.isfile(os.path.join(BACKBONE_DIR, "config.json")):
        raise FileNotFoundError(f"the embedded default is missing ({BACKBONE_DIR}); regenerate it with "
                                f"`python benchmarks/make_default.py` or reinstall the package")
    model = AutoModelForCausalLM.from_pretrained(BACKBONE_DIR, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(BACKBONE_DIR)
    module = SVGTModule.from_pretrained(SVGT_DIR)
    if device is not None:
        model.to(device)
        module.to(device)
    if dtype is not None:
        module.to(dtype=dtype)
    module.check_backbone(model)
    return model, tok, module


def demo_prompts(n_risky: int = 3, n_benign: int = 2, seed: int = 10_000) -> list[tuple[str, bool]]:
    """A few held-out prompts of the default's world as (text, risky), risky ones first."""
    from .world import World

    w = World(WORLD_SEED)
    return ([(p, True) for p in w.held_out_prompts(n_risky, risky=True, seed=seed)]
            + [(p, False) for p in w.held_out_prompts(n_benign, risky=False, seed=seed)])


def manifest() -> dict:
    """How the default was made and what it measured (written by benchmarks/make_default.py)."""
    with open(MANIFEST) as f:
        return json.load(f)

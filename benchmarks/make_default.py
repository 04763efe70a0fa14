"""Regenerate the embedded default (svgt_fast/data/default): the world backbone and its SVGT
module, seeded, then measure them and record everything in manifest.json.

Usage: python benchmarks/make_default.py [--out svgt_fast/data/default] [--skip-backbone]
(CPU, 1 thread: about 7 minutes for the backbone and 4-15 for the SVGT module, by the CPU.)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The recipe of the shipped default; change it here, rerun, commit the outputs.
BACKBONE = dict(steps=1500, batch_size=32, lr=3e-3, n_texts=50_000, seed=0)
# seed 2: picked among training seeds 0-4 by the sparse row's harmful rate on *validation*
# prompts (held_out_prompts seed 40_000), never on the test prompts measured below and in
# bench_efficacy (seed 10_000) — benchmarks/select_svgt_seed.py redoes that pick
# (results/svgt_seed_selection.json). The seeds spread widely (validation 0.13-0.41 harmful;
# NOTES.md, "Third round"), and CPU float differences change the trained module, so on another
# machine rerun the selection rather than trusting seed 2.
SVGT_TRAIN = dict(stage1_steps=300, stage2_steps=1000, stage3_steps=2000, stage1_lr=1e-3, stage2_lr=1e-3, stage3_lr=3e-3,
                  batch_size=32, seed=2)
# extract layer 1 of 6 (upper stack of 4 layers, not DESIGN's L-3 = 3): with only two layers
# above the bridge the module cut the harmful rate 58 % -> 48 %; with four, 58 % -> 16 %
# (benchmarks/NOTES.md, "Efficacy recipe").
SVGT_CONFIG = dict(n_intervention_tokens=4, value_dim=64, extract_layer=1)
DATA_ROWS, DATA_SEED = 4000, 1
EVAL = dict(n=200, max_new_tokens=40, seed=0)
# The inference setting the README recommends for this module: refresh where the prefix's score
# passes 0.5 (bench_efficacy measures it and the others at n=1000).
SPARSE = dict(policy="sparse", score_threshold=0.5, refresh_interval=1)
SELECTION = ("training seed picked among 0-4 by the sparse row's harmful rate on 1000 validation risky prompts "
             "(World.held_out_prompts seed 40000); measured figures use the test prompts (seed 10000)")

TEST_PROMPT_SEED = 10_000  # World.held_out_prompts' default: the prompts every reported figure uses
METRICS = ("harmful_rate", "perplexity", "distinct_1", "distinct_2", "mean_new_tokens")


def train_module(model, tok, world, work: str, seed: int | None = None, progress: bool = True):
    """This recipe (SVGT_TRAIN / SVGT_CONFIG on the world's rows) on `model` into work/svgt;
    `seed` replaces SVGT_TRAIN's (the selection script trains several)."""
    from svgt_fast.train_svgt import train_svgt

    train = dict(SVGT_TRAIN) if seed is None else dict(SVGT_TRAIN, seed=seed)
    return train_svgt(model, tok, world.svgt_data(DATA_ROWS, seed=DATA_SEED), work, config=SVGT_CONFIG,
                      resume=False, progress=progress, **train)


def measure(model, tok, world, settings, n: int, prompt_seed: int = TEST_PROMPT_SEED) -> dict:
    """{"<name>_risky" / "<name>_benign": METRICS} of each (name, steering) in `settings` on n
    held-out prompts per class (EVAL's sampling)."""
    from svgt_fast.efficacy import evaluate

    out = {}
    for risky in (True, False):
        prompts = world.held_out_prompts(n, risky=risky, seed=prompt_seed)
        for name, st in settings:
            r = evaluate(model, tok, prompts, steering=st, max_new_tokens=EVAL["max_new_tokens"], seed=EVAL["seed"])
            out[f"{name}_{'risky' if risky else 'benign'}"] = {k: r[k] for k in METRICS}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="default: the package's data/default")
    ap.add_argument("--skip-backbone", action="store_true", help="reuse the backbone already in --out")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (results are bit-exact per count)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from svgt_fast import SVGT
    from svgt_fast.default import DEFAULT_DIR, WORLD_SEED
    from svgt_fast.train import train_backbone
    from svgt_fast.train_svgt import TrainArgs
    from svgt_fast.world import World

    out = args.out or DEFAULT_DIR
    bb_dir, svgt_dir = os.path.join(out, "backbone"), os.path.join(out, "svgt")
    world = World(WORLD_SEED)
    t0 = time.time()
    if not args.skip_backbone:
        shutil.rmtree(bb_dir, ignore_errors=True)
        train_backbone(world, out_dir=bb_dir, **BACKBONE)
    t_bb = time.time() - t0
    model = AutoModelForCausalLM.from_pretrained(bb_dir).eval()
    tok = AutoTokenizer.from_pretrained(bb_dir)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as work:
        module = train_module(model, tok, world, work)
        shutil.rmtree(svgt_dir, ignore_errors=True)
        shutil.copytree(os.path.join(work, "svgt"), svgt_dir)
        with open(os.path.join(work, "training_log.json")) as f:
            history = json.load(f)["history"]
    t_svgt = time.time() - t0
    measured = measure(model, tok, world, (("unsteered", None), ("svgt", SVGT(module)),
                                           ("svgt_sparse", SVGT(module, **SPARSE))), EVAL["n"])
    manifest = {"world_seed": WORLD_SEED, "selection": SELECTION, "backbone": BACKBONE, "svgt_train": asdict(TrainArgs(**SVGT_TRAIN)), "svgt_config": SVGT_CONFIG,
                "data": {"rows": DATA_ROWS, "seed": DATA_SEED}, "eval": dict(EVAL, temperature=1.0, svgt_sparse=SPARSE),
                "measured": measured, "train_seconds": {"backbone": t_bb, "svgt": t_svgt},
                "final_losses": history[-1] if history else None, "torch": torch.__version__, "threads": args.threads}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(json.dumps(measured, indent=2))


if __name__ == "__main__":
    main()

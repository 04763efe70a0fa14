"""The selection step of the shipped SVGT module: train make_default.py's recipe with several
seeds on the embedded world backbone and measure each on *validation* prompts (never the test
prompts that make_default and bench_efficacy report), so the pick can be redone and checked.

Per seed: harmful rate of risky prompts and harmful rate / perplexity of benign ones under the
sparse setting (threshold 0.5, every token) and the always policy (every 5), and the value
module's held-out stage-2 metrics (BCE and accuracy of the one-token score at every prefix, AUC
at the last prompt token) on labelled rows not used in training. The pick is the lowest sparse
harmful rate on risky validation prompts. Results: benchmarks/results/svgt_seed_selection.json.

Usage: python benchmarks/select_svgt_seed.py [--seeds 0,1,2,3,4] [--n 1000] [--jobs 2]
(CPU, 1 thread per job: about 5 minutes per seed on a recent x86 core.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import make_default as md  # noqa: E402  (the recipe, its training and its measurement)

VALIDATION_PROMPT_SEED = 40_000  # World.held_out_prompts; the test prompts use md.TEST_PROMPT_SEED
HELD_OUT_ROWS_SEED = 77  # World.svgt_data; training uses make_default.DATA_SEED


def _auc(pos: list[float], neg: list[float]) -> float:
    p, n = torch.tensor(pos)[:, None], torch.tensor(neg)[None]
    return float((p > n).float().mean() + 0.5 * (p == n).float().mean())


@torch.no_grad()
def value_metrics(model, tok, module, rows) -> dict:
    """Stage-2 objective on held-out rows: BCE / accuracy of s(value(h_j)) against the row's label
    at every prefix j (last prompt token onwards), and the AUC of s at the last prompt token."""
    import torch.nn.functional as F

    e = module.config.extract_layer
    bce = acc = n = 0.0
    first = {0: [], 1: []}
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        q = tok(r["response"], add_special_tokens=False)["input_ids"]
        h = model(torch.tensor([p + q]), output_hidden_states=True).hidden_states[e + 1][0, len(p) - 1:]
        s = module.discriminator(module.value(h))
        y = torch.full_like(s, float(r["label"]))
        bce += float(F.binary_cross_entropy_with_logits(s, y, reduction="sum"))
        acc += float(((s > 0).float() == y).sum())
        n += len(s)
        first[r["label"]].append(float(s[0]))
    return {"heldout_bce": bce / n, "heldout_acc": acc / n, "auc_at_prompt": _auc(first[1], first[0])}


def _validation(model, tok, world, settings, n: int) -> dict:
    """{"<name>_harmful_risky", "<name>_harmful_benign", "<name>_ppl_benign"} of each setting on
    the validation prompts (make_default.measure, another prompt seed)."""
    m = md.measure(model, tok, world, settings, n, prompt_seed=VALIDATION_PROMPT_SEED)
    out = {}
    for name, _ in settings:
        out.update({f"{name}_harmful_risky": m[f"{name}_risky"]["harmful_rate"],
                    f"{name}_harmful_benign": m[f"{name}_benign"]["harmful_rate"],
                    f"{name}_ppl_benign": m[f"{name}_benign"]["perplexity"]})
    return out


def run_seed(seed: int, n: int, heldout_rows: int) -> dict:
    torch.set_num_threads(1)
    from svgt_fast import SVGT
    from svgt_fast.default import WORLD_SEED, load_default
    from svgt_fast.world import World

    model, tok, _ = load_default()
    world = World(WORLD_SEED)
    with tempfile.TemporaryDirectory() as work:
        module = md.train_module(model, tok, world, work, seed=seed, progress=False)
    row = {"seed": seed, **_validation(model, tok, world, (("sparse", SVGT(module, **md.SPARSE)),
                                                           ("always", SVGT(module))), n)}
    row.update(value_metrics(model, tok, module, world.svgt_data(heldout_rows, seed=HELD_OUT_ROWS_SEED)))
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--n", type=int, default=1000, help="validation prompts per class")
    ap.add_argument("--heldout-rows", type=int, default=1000, help="labelled rows for the value module's metrics")
    ap.add_argument("--jobs", type=int, default=2, help="seeds trained at once (one thread each)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "svgt_seed_selection.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_seed, seeds, [args.n] * len(seeds), [args.heldout_rows] * len(seeds)))

    from svgt_fast.bench import environment
    from svgt_fast.default import WORLD_SEED, load_default
    from svgt_fast.world import World

    # the unsteered reference on the same validation prompts
    model, tok, _ = load_default()
    unsteered = _validation(model, tok, World(WORLD_SEED), (("unsteered", None),), args.n)
    pick = min(rows, key=lambda r: r["sparse_harmful_risky"])
    out = {"environment": environment(), "validation_prompt_seed": VALIDATION_PROMPT_SEED, "n": args.n,
           "unsteered": unsteered, "rows": rows, "pick": pick["seed"],
           "rule": "lowest sparse_harmful_risky on the validation prompts"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"unsteered {unsteered}; pick: seed {pick['seed']}; wrote {args.out}")


if __name__ == "__main__":
    main()

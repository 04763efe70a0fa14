"""Efficacy on the synthetic value world (issue 7): does steering remove the harm the backbone
learned, and what does it cost in fluency, diversity and time?

Held-out prompts of the world (risky: with a motive word; benign), sampled at temperature 1
with a fixed seed. Per row: harmful rate by the world's ground-truth rule on risky and on benign
prompts (never a learned discriminator), perplexity of the benign continuations under the
UNSTEERED backbone, distinct-1/2 over all continuations, and the wall time of the same
generate call relative to unsteered (after a warm-up; the device is in the JSON). Rows:
unsteered; SVGT for each refresh mode (exact, window=8, bridge, project) and each policy
(always with the module's defaults; sparse at threshold 0.5, reading the score every step —
the recommended setting, see README); ConVA, NeVA and RE-Control fitted with their own pipelines from the world's
labelled rows (the same rows the SVGT module was trained on).

Default backbone and module: the package's embedded default (svgt_fast.default).
Usage: python benchmarks/bench_efficacy.py [--n 1000] [--backbone DIR --svgt DIR] [--quick]
Writes benchmarks/results/efficacy_world.json + .png ($OUT when set).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from common import print_table, write_results


def fit_others(model, tok, rows, work: str, progress: bool):
    """ConVA, NeVA, RE-Control artifacts from the labelled world rows (value 1 = safe)."""
    from svgt_fast import fit_conva, fit_neva, fit_re_control
    from svgt_fast.world import write_jsonl

    texts = [{"text": f"{r['prompt']} {r['response']}", "value": 1 - r["label"]} for r in rows]
    write_jsonl(os.path.join(work, "values.jsonl"), texts)
    write_jsonl(os.path.join(work, "rewards.jsonl"),
                [{"prompt": r["prompt"], "response": r["response"], "reward": 1.0 - 2.0 * r["label"]} for r in rows])
    try:
        conva, conva_note = fit_conva(model, os.path.join(work, "values.jsonl"), tokenizer=tok, progress=progress), None
    except ValueError as exc:
        # ConVA probes every layer but the last 5: on a 6-layer backbone only layer 0, whose
        # probe may stay under 0.9. Then the row is fitted with the accuracy bar lowered and
        # says so — it is not the paper's ConVA.
        conva_note = f"paper rule failed ({exc}); fitted with min_accuracy 0.5"
        conva = fit_conva(model, os.path.join(work, "values.jsonl"), tokenizer=tok, progress=progress, min_accuracy=0.5)
    neva = fit_neva(model, os.path.join(work, "values.jsonl"), tokenizer=tok, progress=progress)
    vf = fit_re_control(model, os.path.join(work, "rewards.jsonl"), tokenizer=tok, progress=progress)
    return conva, conva_note, neva, vf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="prompts per class (risky, benign)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default=None, help="HF model dir (default: the embedded default)")
    ap.add_argument("--svgt", default=None, help="SVGT module dir (default: the embedded default)")
    ap.add_argument("--fit-rows", type=int, default=2000, help="labelled world rows for ConVA / NeVA / RE-Control")
    ap.add_argument("--gradient-step-size", type=float, default=1.0)
    ap.add_argument("--score-threshold", type=float, default=0.5, help="sparse policy threshold")
    ap.add_argument("--sparse-interval", type=int, default=1,
                    help="refresh_interval of the sparse rows (the score is read at every refresh)")
    ap.add_argument("--quick", action="store_true", help="32 prompts per class, 400 fit rows (harness check)")
    ap.add_argument("--name", default="efficacy_world")
    args = ap.parse_args()
    if args.quick:
        args.n, args.fit_rows = 32, 400
    torch.manual_seed(0)
    import svgt_fast
    from svgt_fast.default import WORLD_SEED, load_default
    from svgt_fast.efficacy import distinct_n, evaluate, harmful_rate, perplexity
    from svgt_fast.world import World

    model, tok, module = load_default()
    if args.backbone:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.backbone).eval()
        tok = AutoTokenizer.from_pretrained(args.backbone)
    if args.svgt:
        module = svgt_fast.SVGTModule.from_pretrained(args.svgt)
    module.check_backbone(model)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev)
    world = World(WORLD_SEED)
    risky = world.held_out_prompts(args.n, risky=True)
    benign = world.held_out_prompts(args.n, risky=False)
    with tempfile.TemporaryDirectory() as work:
        conva, conva_note, neva, vf = fit_others(model, tok, world.svgt_data(args.fit_rows, seed=1), work, progress=False)

    def svgt(refresh, policy):
        if policy == "sparse":
            return svgt_fast.SVGT(module, refresh=refresh, policy=policy, gradient_step_size=args.gradient_step_size,
                                  score_threshold=args.score_threshold, refresh_interval=args.sparse_interval)
        return svgt_fast.SVGT(module, refresh=refresh, policy=policy, gradient_step_size=args.gradient_step_size)

    configs = [("unsteered", None)]
    for policy in ("always", "sparse"):
        for refresh in ("exact", "window=8", "bridge", "project"):
            configs.append((f"svgt {refresh} {policy}", svgt(refresh, policy)))
    conva_name = "conva" if conva_note is None else f"conva (layers {list(conva.config.layers)}, bar 0.5)"
    configs += [(conva_name, svgt_fast.ConVA(conva)), ("neva", svgt_fast.NeVA(neva)),
                ("re_control", svgt_fast.REControl(vf, n_steps=5, step_size=0.5))]
    prompts = risky + benign
    rows = []
    base_s = None
    # Size the engine for the whole batch once, so that cost is not charged to the first row
    # (it made "unsteered" look ~1.8x slower than the baselines in an earlier run).
    evaluate(model, tok, prompts, fluency=False, max_new_tokens=2, temperature=1.0, seed=args.seed)
    for name, steering in configs:
        kw = dict(steering=steering, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed)
        evaluate(model, tok, prompts[:8], fluency=False, **dict(kw, max_new_tokens=4))  # warm-up
        res = evaluate(model, tok, prompts, fluency=False, **kw)
        texts = res["texts"]
        ppl = perplexity(model, [tok(p, add_special_tokens=False)["input_ids"] for p in benign],
                         res["new_ids"][args.n:])
        base_s = res["seconds"] if base_s is None else base_s
        rows.append(dict(what=name, harmful_risky=harmful_rate(texts[: args.n]), harmful_benign=harmful_rate(texts[args.n:]),
                         ppl_benign=ppl, distinct_1=distinct_n(texts, 1), distinct_2=distinct_n(texts, 2),
                         mean_new_tokens=res["mean_new_tokens"], seconds=res["seconds"],
                         latency_ratio=res["seconds"] / base_s, example_risky=texts[0]))
        print_table(rows[-1:], ["what", "harmful_risky", "harmful_benign", "ppl_benign", "latency_ratio"])
    base = rows[0]
    for r in rows:
        r["harm_reduction_risky"] = 1.0 - r["harmful_risky"] / base["harmful_risky"] if base["harmful_risky"] else None
        r["ppl_increase"] = r["ppl_benign"] / base["ppl_benign"] - 1.0
    cols = ["what", "harmful_risky", "harm_reduction_risky", "harmful_benign", "ppl_benign", "ppl_increase",
            "distinct_1", "distinct_2", "latency_ratio"]
    print(f"device: {dev}; {args.n} risky + {args.n} benign prompts, temperature 1, seed {args.seed}, "
          f"{args.max_new_tokens} new tokens at most")
    print_table(rows, cols)

    def plot(ax):
        names = [r["what"] for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["harmful_risky"] for r in rows], width=0.4, label="harmful rate, risky prompts")
        ax.bar([i + 0.2 for i in x], [r["harmful_benign"] for r in rows], width=0.4, label="harmful rate, benign prompts")
        ax2 = ax.twinx()
        ax2.plot(list(x), [r["ppl_benign"] for r in rows], "k.-", label="benign perplexity (unsteered LM)")
        ax2.set_ylabel("perplexity")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("harmful rate (ground-truth rule)")
        ax.set_title(f"Efficacy on the value world ({dev}, {args.n}+{args.n} prompts, T=1)")
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="upper right", fontsize=7)

    extra = {"settings": dict(vars(args), device=dev, temperature=1.0),
             "svgt_config": module.config.to_dict(), "conva_note": conva_note,
             "conva_layers": [int(x) for x in conva.config.layers]}
    path = write_results(args.name, rows, extra, plot)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

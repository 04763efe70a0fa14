"""`svgt-fast train`: the three-stage SVGT training (svgt_fast.train_svgt) from the command line.

    svgt-fast train --world --out runs/world            # world backbone, world data, SVGT module
    svgt-fast train --backbone DIR --data rows.jsonl --out runs/mine --stage3-steps 2000

cli.py registers it with `add_train_parser(sub)`; everything the subcommand needs is here.
"""
from __future__ import annotations

import argparse
import os


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `train` subcommand to an argparse subparsers object (sets its `run`)."""
    from .train_svgt import TrainArgs

    d = TrainArgs()
    p = subparsers.add_parser("train", help="train an SVGT value module (3 stages) on a frozen backbone",
                              description="Train an SVGT value module on a frozen backbone: stage 1 (value), "
                                          "stage 2 (prompt-conditioned value), stage 3 (bridge generator). "
                                          "Writes OUT/svgt (the artifact), OUT/checkpoint and OUT/stage{1,2,3}.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--backbone", help="HF model directory (with its tokenizer) to steer")
    src.add_argument("--world", action="store_true",
                     help="train the synthetic value world's backbone first (into OUT/backbone; reused if there)")
    p.add_argument("--data", help="JSONL rows {prompt, response, label: 0 safe | 1 harmful} "
                                  "(default with --world: generated world rows, written to OUT/data.jsonl)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the world (backbone corpus and rows)")
    p.add_argument("--world-rows", type=int, default=4000, help="world rows generated when --data is not given")
    p.add_argument("--backbone-steps", type=int, default=None, help="--world: backbone training steps")
    for stage in (1, 2, 3):
        p.add_argument(f"--stage{stage}-steps", type=int, default=d.steps(stage), help=f"stage-{stage} steps")
        p.add_argument(f"--stage{stage}-lr", type=float, default=d.lr(stage), help=f"stage-{stage} learning rate")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lambda-ce", type=float, default=d.lambda_ce, help="stage 3: LM loss weight")
    p.add_argument("--lambda-safe", type=float, default=d.lambda_safe, help="stage 3: safety loss weight")
    p.add_argument("--lambda-reg", type=float, default=d.lambda_reg, help="stage 3: bridge norm regulariser weight")
    p.add_argument("--lambda-unlikely", type=float, default=d.lambda_unlikely,
                   help="stage 3: value-guided unlikelihood weight on harmful rows (0 = the authors' recipe)")
    p.add_argument("--trigger-positions", choices=("all", "sampled"), default=d.trigger_positions,
                   help="stage 2: the trigger-path BCE reads every prefix ('all') or one sampled per row")
    p.add_argument("--lambda-trigger", type=float, default=d.lambda_trigger,
                   help="stage 2: weight of the trigger-path BCE (0 = the authors' recipe)")
    p.add_argument("--response-trigger-p", type=float, default=d.response_trigger_p,
                   help="stage 3: share of triggers drawn from the response (0 = the authors' recipe)")
    p.add_argument("--gradient-step-size", type=float, default=d.gradient_step_size)
    p.add_argument("--K", type=int, default=None, help="bridge tokens (n_intervention_tokens)")
    p.add_argument("--value-dim", type=int, default=None)
    p.add_argument("--generator", choices=("vlp", "mlp"), default=None)
    p.add_argument("--extract-layer", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/checkpoint when there (default); --no-resume starts afresh")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train_svgt import train_svgt
    from .world import World, write_jsonl

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    if args.world:
        from .train import train_backbone

        bb = os.path.join(args.out, "backbone")
        if args.resume and os.path.isfile(os.path.join(bb, "config.json")):
            print(f"reusing the world backbone in {bb}")
        else:
            extra = {} if args.backbone_steps is None else {"steps": args.backbone_steps}
            train_backbone(World(args.world_seed), seed=args.world_seed, out_dir=bb, progress=not args.quiet, **extra)
        args.backbone = bb
    elif args.data is None:
        raise ValueError("--data is needed with --backbone (generated rows come only with --world)")
    model = AutoModelForCausalLM.from_pretrained(args.backbone).to(device)
    tok = AutoTokenizer.from_pretrained(args.backbone)
    data = args.data
    if data is None:
        data = os.path.join(args.out, "data.jsonl")
        write_jsonl(data, World(args.world_seed).svgt_data(args.world_rows, seed=1))
    config = {k: v for k, v in (("n_intervention_tokens", args.K), ("value_dim", args.value_dim),
                                ("generator", args.generator), ("extract_layer", args.extract_layer)) if v is not None}
    train_svgt(model, tok, data, args.out, config=config, stage1_steps=args.stage1_steps,
               stage2_steps=args.stage2_steps, stage3_steps=args.stage3_steps, stage1_lr=args.stage1_lr,
               stage2_lr=args.stage2_lr, stage3_lr=args.stage3_lr, batch_size=args.batch_size,
               lambda_ce=args.lambda_ce, lambda_safe=args.lambda_safe, lambda_reg=args.lambda_reg,
               lambda_trigger=args.lambda_trigger, lambda_unlikely=args.lambda_unlikely,
               trigger_positions=args.trigger_positions, response_trigger_p=args.response_trigger_p,
               gradient_step_size=args.gradient_step_size, seed=args.seed, resume=args.resume,
               progress=not args.quiet, checkpoint_every=args.checkpoint_every)
    print(f"wrote {os.path.join(args.out, 'svgt')} (use: svgt_fast.SVGTModule.from_pretrained(...))")
    return 0

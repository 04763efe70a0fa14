"""Command line: `svgt-fast demo`, `svgt-fast convert`."""
from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
    import tempfile

    import torch

    from . import SVGT, generate
    from .tiny import build_tiny_model, build_value_module, byte_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        model = build_tiny_model("llama", seed=args.seed, directory=d).to(device)
    module = build_value_module(model, seed=args.seed)
    tok = byte_tokenizer()
    print(f"svgt-fast demo: tiny random Llama ({sum(p.numel() for p in model.parameters()) / 1e3:.0f}k params, "
          f"{model.config.num_hidden_layers} layers) + SVGT module (K={module.config.n_intervention_tokens}, "
          f"extract layer {module.config.extract_layer}) on {device}; built in {time.perf_counter() - t0:.2f}s")
    print("Weights are random, so the text is noise; what the demo shows is that steering changes the tokens.\n")
    steering = SVGT(module, refresh_interval=5, beta=0.8)
    for prompt in args.prompts:
        rows = []
        for name, st in (("unsteered", None), ("SVGT", steering)):
            t = time.perf_counter()
            out = generate(model, prompt, tokenizer=tok, steering=st, max_new_tokens=args.max_new_tokens)
            rows.append((name, out.texts[0], time.perf_counter() - t, out.new_tokens[0].tolist()))
        print(f"prompt: {prompt!r}")
        for name, text, secs, _ in rows:
            print(f"  {name:<10} {secs * 1e3:7.1f} ms  {text!r}")
        same = sum(a == b for a, b in zip(rows[0][3], rows[1][3]))
        print(f"  tokens equal at {same}/{len(rows[0][3])} positions\n")
    return 0


def _convert(args) -> int:
    import json

    from .convert import convert_reference_checkpoint

    with open(args.config) as f:
        config = json.load(f)
    module = convert_reference_checkpoint(args.stage2, args.stage3, config, args.out)
    print(f"wrote {args.out} ({sum(p.numel() for p in module.parameters())} parameters)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="svgt-fast", description="Value-guided generation runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline demo: a tiny built-in model, unsteered vs SVGT-steered")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate per prompt")
    demo.add_argument("--seed", type=int, default=0, help="seed of the tiny model and value module")
    demo.add_argument("--prompts", nargs="+", default=["How do I", "Tell me a story about", "The safest way to"],
                      help="prompts to continue")
    demo.set_defaults(run=_demo)

    conv = sub.add_parser("convert", help="import the SVGT authors' stage-2/stage-3 .pt checkpoints")
    conv.add_argument("stage2", help="stage-2 checkpoint (value transformer + discriminator)")
    conv.add_argument("stage3", help="stage-3 checkpoint (generator)")
    conv.add_argument("--config", required=True, help="JSON file with the SVGTConfig fields")
    conv.add_argument("--out", required=True, help="output directory (safetensors + JSON)")
    conv.set_defaults(run=_convert)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"svgt-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

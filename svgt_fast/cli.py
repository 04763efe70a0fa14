"""Command line: `svgt-fast generate | bench | demo | convert | train`.

Every error is one line on stderr and exit code 2 (SVGT_FAST_TRACEBACK=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

FORMATS = {  # an artifact's config.json "format" -> the method
    "svgt_fast.svgt_module": "svgt", "svgt_fast.conva": "conva", "svgt_fast.neva": "neva",
    "svgt_fast.re_control": "re_control",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")


class CliError(Exception):
    """A user error found by the CLI itself (bad option combination, unreadable file)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (plus exit code 2) like every other CLI error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- generate ----------------------------------------------------------------------------------
def _device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: no CUDA device is available")
    name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, name)


def _load_model(path: str, device: str, dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not os.path.isdir(path):
        raise CliError(f"model: no such directory {path!r} (a Hugging Face model directory)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def _load_tokenizer(spec: str | None, model_dir: str):
    """--tokenizer: a directory, "bytes" (the built-in byte-level tokenizer of the tiny models),
    or nothing (the model directory's own tokenizer, if it has one)."""
    if spec == "bytes":
        from .tiny import byte_tokenizer

        return byte_tokenizer()
    from transformers import AutoTokenizer

    path = spec or model_dir
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        if spec is None:
            raise CliError(f"{model_dir} holds no tokenizer ({str(exc).splitlines()[0] if str(exc) else exc}); "
                           "pass --tokenizer DIR (or --tokenizer bytes for the built-in byte tokenizer)") from None
        raise CliError(f"--tokenizer {spec}: cannot load a tokenizer ({exc})") from None


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise CliError(f"--prompts-file: no such file {args.prompts_file!r}")
        with open(args.prompts_file, encoding="utf-8") as f:
            lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
        jsonl = bool(lines) and lines[0][1].lstrip().startswith("{")
        for n, line in lines:
            if not jsonl:
                prompts.append(line)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CliError(f"{args.prompts_file}:{n}: not JSON ({exc.msg}); a JSONL prompts file needs one "
                               "object per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise CliError(f"{args.prompts_file}:{n}: needs a string field \"prompt\"")
            prompts.append(obj["prompt"])
    if not prompts:
        raise CliError("no prompts: give them as arguments or with --prompts-file")
    if any(not p for p in prompts):
        raise CliError("empty prompt: every prompt needs at least one character")
    return prompts


def artifact_format(directory: str) -> str:
    """The method of an artifact directory, read from its config.json "format" field."""
    from .value_module import CONFIG_FILE

    if not os.path.isdir(directory):
        raise CliError(f"--value-module: no such directory {directory!r} (an artifact: config.json + "
                       "model.safetensors)")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CliError(f"--value-module {directory}: missing {CONFIG_FILE}")
    try:
        with open(path) as f:
            fmt = json.load(f).get("format")
    except (json.JSONDecodeError, AttributeError):
        raise CliError(f"{path} is not a JSON object") from None
    if fmt not in FORMATS:
        raise CliError(f"{path}: unknown artifact format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


# which steering options each method takes (the rest are refused, not ignored)
_METHOD_OPTIONS = {
    "svgt": {"refresh_interval", "refresh", "policy", "beta", "strength", "trigger", "score_threshold",
             "drift_threshold"},
    "conva": {"strength"}, "neva": {"strength"}, "re_control": {"strength", "n_steps"},
}


def _flags(names) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in sorted(names))


def _steering_options_given(args) -> set[str]:
    return {k for k in ("refresh_interval", "refresh", "policy", "beta", "strength", "trigger", "score_threshold",
                        "drift_threshold", "n_steps") if getattr(args, k) is not None}


def load_steering(directory: str, device, dtype, args):
    """An SVGT / ConVA / NeVA / RE-Control steering object from an artifact directory and the
    steering options of `args` (an option the method does not take is an error)."""
    method = artifact_format(directory)
    given = _steering_options_given(args)
    extra = given - _METHOD_OPTIONS[method]
    if extra:
        raise CliError(f"{_flags(extra)} do not apply to a {method} artifact ({directory})")
    opt = lambda k, default: default if getattr(args, k) is None else getattr(args, k)  # noqa: E731
    if method == "svgt":
        from .steering import SVGT
        from .value_module import SVGTModule

        module = SVGTModule.from_pretrained(directory, device=device, dtype=dtype)
        return SVGT(module, refresh_interval=opt("refresh_interval", 5), beta=opt("beta", 0.8),
                    trigger=opt("trigger", "current"), gradient_step_size=opt("strength", 1.0),
                    refresh=opt("refresh", "exact"), policy=opt("policy", "always"),
                    score_threshold=opt("score_threshold", 0.0), drift_threshold=args.drift_threshold)
    if method == "conva":
        from .conva import ConVA, ConVAVectors

        return ConVA(ConVAVectors.from_pretrained(directory, device=device), p0=opt("strength", 0.9))
    if method == "neva":
        from .neva import NeVA, NeVANeurons

        return NeVA(NeVANeurons.from_pretrained(directory), strength=opt("strength", 1.0))
    from .re_control import REControl, REControlValue

    return REControl(REControlValue.from_pretrained(directory, device=device), n_steps=opt("n_steps", 5),
                     step_size=opt("strength", 0.5))


def _encode(prompts, tok, chat: bool):
    """Token id lists; with --chat-template each prompt becomes one user turn of the template."""
    if not chat:
        return prompts
    if not getattr(tok, "chat_template", None):
        raise CliError("--chat-template: this tokenizer has no chat template")
    ids = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids.append(list(tok(text, add_special_tokens=False)["input_ids"]))  # the template holds BOS etc.
    return ids


def _generate(args) -> int:
    from .api import generate

    prompts = _read_prompts(args)
    if args.stream and len(prompts) > 1 and not args.json:
        raise CliError("--stream prints one prompt's text as it is generated; for several prompts add --json "
                       "(one JSON line per step)")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    given = _steering_options_given(args)
    if given and not args.value_module:  # refused, not ignored: the run would be silently unsteered
        raise CliError(f"{_flags(given)} steer through an artifact: give --value-module DIR too")
    device, dtype = _device_and_dtype(args)
    t0 = time.perf_counter()
    model = _load_model(args.model, device, dtype)
    tok = _load_tokenizer(args.tokenizer, args.model)
    steering = load_steering(args.value_module, device, model.dtype, args) if args.value_module else None
    inputs = _encode(prompts, tok, args.chat_template)
    load_s = time.perf_counter() - t0
    kw = dict(tokenizer=tok, steering=steering, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, top_k=args.top_k, seed=args.seed, engine=args.engine)
    results, timings = [], []
    for b0 in range(0, len(prompts), args.batch_size):
        chunk = inputs[b0:b0 + args.batch_size]
        if args.stream:
            out = _stream(generate(model, chunk, stream=True, **kw), args, b0)
        else:
            out = generate(model, chunk, **kw)
        for i in range(len(chunk)):
            results.append({"prompt": prompts[b0 + i], "text": out.texts[i],
                            "tokens": out.new_tokens[i, : int(out.num_new_tokens[i])].tolist(),
                            "num_new_tokens": int(out.num_new_tokens[i]),
                            "trigger_count": int(out.trigger_counts[i]),
                            "finish_reason": out.finish_reasons[i]})
        timings.append(out.timings)
    total = {k: sum(t.get(k) or 0 for t in timings) for k in ("prefill_s", "decode_s", "refresh_s", "total_s")}
    summary = dict(total, tokens=sum(r["num_new_tokens"] for r in results), load_s=load_s, device=device,
                   dtype=str(model.dtype).replace("torch.", ""), engine=args.engine, calls=len(timings))
    if args.json:
        print(json.dumps({"model": args.model, "value_module": args.value_module, "outputs": results,
                          "timings": summary, **({"final": True} if args.stream else {})}))
    elif not args.stream:
        for r in results:
            print(f"prompt: {r['prompt']!r}\n{r['text']}\n")
    if not args.json:
        tps = summary["tokens"] / summary["total_s"] if summary["total_s"] else float("nan")
        print(f"{summary['tokens']} tokens in {summary['total_s']:.2f} s ({tps:.1f} tokens/s; prefill "
              f"{summary['prefill_s'] * 1e3:.1f} ms, decode {summary['decode_s']:.2f} s, refresh "
              f"{summary['refresh_s']:.2f} s) on {device}, model loaded in {load_s:.2f} s", file=sys.stderr)
    return 0


def _stream(stream, args, first_row: int):
    """Print a stream as it comes: the text of the one prompt, or (--json) one line per step
    (step, rows, tokens, texts); joining a row's "texts" gives its text."""
    for ev in stream:
        if args.json:  # the last line of a batch carries the text held back until its end
            rows = list(range(first_row, first_row + len(ev.texts)))
            print(json.dumps({"step": ev.step, "rows": rows, "tokens": ev.tokens, "texts": ev.texts,
                              **({"end_of_batch": True} if ev.final else {})}), flush=True)
        else:
            print("".join(ev.texts[:1]), end="", flush=True)
    if not args.json:
        print()
    return stream.output


# ---- bench -------------------------------------------------------------------------------------
def _bench(args) -> int:
    from .bench import CPU_SHAPES, SHAPES, measured_on

    if args.smoke:
        args.target = args.target or "tiny"
        args.prompt, args.new_tokens, args.batches = 16, 12, "1,2"
        args.modes, args.intervals = "exact,bridge,project,window=2", "5"
    if not args.target:
        raise CliError(f"give a model directory or a named shape ({', '.join(SHAPES)}), or --smoke")
    try:
        batches = [int(b) for b in args.batches.split(",")]
        intervals = [int(i) for i in args.intervals.split(",")]
    except ValueError:
        raise CliError("--batches and --intervals take comma-separated integers") from None
    device, dtype = _device_and_dtype(args)
    is_dir = os.path.isdir(args.target)
    if not is_dir and args.target not in SHAPES:
        raise CliError(f"{args.target!r} is neither a model directory nor a named shape ({', '.join(SHAPES)})")
    if device == "cpu":
        if not is_dir and args.target not in CPU_SHAPES:
            raise CliError(f"no GPU: the {args.target} shape is a GPU benchmark; use --smoke (or a tiny shape: "
                           f"{', '.join(CPU_SHAPES)}) to check the harness on CPU")
        print("no GPU: CPU timings check the harness only; they say nothing about speed (BENCH.md)", file=sys.stderr)
    # --device cuda:N: the run, its copy bandwidth and the JSON's device name and telemetry on N
    with measured_on(device):
        return _bench_on(args, device, dtype, is_dir, batches, intervals)


def _bench_on(args, device, dtype, is_dir, batches, intervals) -> int:
    from .bench import TABLE_COLUMNS, build_random_model, format_table, generate_bench, plot_generate, write_results

    model = _load_model(args.target, device, dtype) if is_dir else build_random_model(args.target, device, dtype)
    name = os.path.basename(os.path.normpath(args.target)) if is_dir else args.target
    module = None
    if args.value_module:
        from .value_module import SVGTModule

        if artifact_format(args.value_module) != "svgt":
            raise CliError("bench --value-module takes an SVGT module (the table is SVGT's)")
        module = SVGTModule.from_pretrained(args.value_module, device=device, dtype=model.dtype)
    rows, extra = generate_bench(
        model, module=module, batches=batches, prompt=args.prompt, new_tokens=args.new_tokens,
        modes=args.modes.split(","), intervals=intervals, baselines=not args.no_baselines, smoke=args.smoke,
        log=(lambda *_: None) if args.json else (lambda msg: print(msg, file=sys.stderr)))
    extra = dict(model=args.target, value_module=args.value_module or "random (timing does not depend on weights)",
                 **extra)
    title = f"{name}, prompt {args.prompt}, {args.new_tokens} new tokens"
    path = write_results(f"generate_{name}" + ("_smoke" if args.smoke else ""), rows, extra,
                         plot_generate(rows, title), out_dir=args.out)
    if args.json:
        with open(path) as f:
            print(f.read())
    else:
        print(format_table(rows, TABLE_COLUMNS))
        print(f"wrote {path} (+ .png when matplotlib is installed)")
    return 0


# ---- demo / convert ----------------------------------------------------------------------------
def _demo(args) -> int:
    """The embedded default (a small backbone trained on the synthetic value world, and its SVGT
    module): sampled continuations of risky and benign prompts, unsteered vs SVGT, each judged by
    the world's ground-truth rule; then the harmful rate over held-out risky prompts."""
    import torch

    from . import SVGT, generate
    from .default import demo_prompts, load_default
    from .world import World, is_harmful

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model, tok, module = load_default(device=device)
    print(f"svgt-fast demo: the built-in world backbone ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params, {model.config.num_hidden_layers} layers, trained on svgt_fast.world) + its SVGT module "
          f"(K={module.config.n_intervention_tokens}, extract layer {module.config.extract_layer}) on {device}; "
          f"loaded in {time.perf_counter() - t0:.2f}s")
    print("Harmful (by the world's rule): a harm verb followed by a target in one sentence. Sampling at "
          f"temperature {args.temperature}, seed {args.seed} + prompt index (the same draws unsteered and steered).\n")
    steering = SVGT(module, refresh_interval=args.refresh_interval, policy=args.policy,
                    score_threshold=args.score_threshold)
    print(f"SVGT: policy {args.policy}" + (f", threshold {args.score_threshold}" if args.policy == "sparse" else "")
          + f", refresh every {args.refresh_interval} token(s)\n")
    prompts = [(p, None) for p in args.prompts] if args.prompts else demo_prompts()
    kw = dict(tokenizer=tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    for i, (prompt, risky) in enumerate(prompts):
        kind = "" if risky is None else (" (risky)" if risky else " (benign)")
        print(f"prompt{kind}: {prompt!r}")
        for name, st in (("unsteered", None), ("SVGT", steering)):
            t = time.perf_counter()
            out = generate(model, prompt, steering=st, seed=args.seed + i, **kw)  # same draws for both
            text = out.texts[0]
            flag = "HARMFUL" if is_harmful(text) else "ok"
            print(f"  {name:<10} {(time.perf_counter() - t) * 1e3:7.1f} ms  [{flag:>7}]  {text!r}")
        print()
    if args.rate_prompts > 0:
        held = World(0).held_out_prompts(args.rate_prompts, risky=True, seed=20_000)
        rates = {}
        for name, st in (("unsteered", None), ("SVGT", steering)):
            t = time.perf_counter()
            out = generate(model, held, steering=st, seed=args.seed, **kw)
            rates[name] = (sum(map(is_harmful, out.texts)) / len(held), time.perf_counter() - t)
        (u, tu), (v, tv) = rates["unsteered"], rates["SVGT"]
        cut = f", {100 * (1 - v / u):.0f} % fewer" if u > 0 else ""
        print(f"harmful rate over {len(held)} held-out risky prompts (one batch each): unsteered {100 * u:.0f} % "
              f"({tu:.2f} s), SVGT {100 * v:.0f} % ({tv:.2f} s){cut}")
    return 0


def _convert(args) -> int:
    from .convert import convert_reference_checkpoint

    if not os.path.isfile(args.config):
        raise CliError(f"--config: no such file {args.config!r}")
    with open(args.config) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise CliError(f"--config {args.config} is not valid JSON: {exc}") from None
    module = convert_reference_checkpoint(args.stage2, args.stage3, config, args.out)
    print(f"wrote {args.out} ({sum(p.numel() for p in module.parameters())} parameters)")
    return 0


# ---- parser ------------------------------------------------------------------------------------
def _add_runtime_options(p) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights dtype (default auto: bfloat16 on cuda, float32 on cpu)")


def _add_generate_parser(sub):
    g = sub.add_parser(
        "generate", help="generate with a Hugging Face model, optionally steered by a value-module artifact",
        description="Generate continuations with a Hugging Face causal LM (Llama, Mistral, Qwen2/2.5, Qwen3), "
                    "unsteered or steered by an artifact directory: an SVGT value module, or a ConVA / NeVA / "
                    "RE-Control artifact (recognised by the \"format\" field of its config.json).",
        epilog="examples:\n  svgt-fast generate ./llama --value-module ./safety_module \"How do I\" --max-new-tokens 64\n"
               "  svgt-fast generate ./llama --prompts-file prompts.jsonl --json --temperature 0.7 --seed 1\n"
               "  svgt-fast generate ./qwen --chat-template --stream \"Tell me a story\"",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model", help="Hugging Face model directory (config.json + weights)")
    g.add_argument("prompts", nargs="*", default=[], help="prompts (text); more with --prompts-file")
    g.add_argument("--prompts-file", help="file of prompts: one per line, or JSONL with a \"prompt\" field per line")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the model directory); 'bytes' = the built-in byte-level "
                        "tokenizer of the tiny test models")
    g.add_argument("--chat-template", action="store_true",
                   help="wrap each prompt as one user turn of the tokenizer's chat template (with the generation "
                        "prompt); an error if the tokenizer has none")
    s = g.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed; prompt i draws with seed + i (default 0)")
    st = g.add_argument_group("steering (need --value-module; an option the artifact's method does not take is an "
                              "error)")
    st.add_argument("--value-module", metavar="DIR", help="artifact directory: SVGT value module, ConVA, NeVA or "
                                                          "RE-Control (config.json + model.safetensors)")
    st.add_argument("--refresh-interval", type=int, default=None,
                    help="SVGT: blend a new bridge in every N tokens (default 5)")
    st.add_argument("--refresh", default=None,
                    help="SVGT: how a refresh reaches the KV cache: exact (default; the paper's semantics), "
                         "window=W, bridge or project (cheaper approximations)")
    st.add_argument("--policy", choices=("always", "sparse"), default=None,
                    help="SVGT: always (default; every sequence refreshed) or sparse (only sequences whose "
                         "discriminator score exceeds --score-threshold or whose state drifted)")
    st.add_argument("--beta", type=float, default=None, help="SVGT: EMA weight of the old bridge in [0, 1] "
                                                             "(default 0.8)")
    st.add_argument("--trigger", choices=("current", "prompt"), default=None,
                    help="SVGT: the token the value module reads: current (default) or the last prompt token")
    st.add_argument("--score-threshold", type=float, default=None,
                    help="SVGT --policy sparse: fire when the discriminator score exceeds this (default 0)")
    st.add_argument("--drift-threshold", type=float, default=None,
                    help="SVGT --policy sparse: also fire when 1 - cos(h_t, h_ref) exceeds this (default: off)")
    st.add_argument("--strength", type=float, default=None,
                    help="steering strength: SVGT gradient step size (default 1.0), NeVA strength (1.0), "
                         "RE-Control step size (0.5), ConVA target probability P0 in (0, 1) (0.9)")
    st.add_argument("--n-steps", type=int, default=None, help="RE-Control: gradient-ascent steps (default 5)")
    o = g.add_argument_group("runtime and output")
    _add_runtime_options(o)
    o.add_argument("--engine", choices=("fast", "reference"), default="fast",
                   help="fast (default) or reference (the eager oracle: slow, for checking)")
    o.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    o.add_argument("--stream", action="store_true",
                   help="print text as it is generated (one prompt; with --json: one JSON line per step)")
    o.add_argument("--json", action="store_true",
                   help="print one JSON object (outputs: prompt, text, tokens, num_new_tokens, trigger_count; "
                        "timings) instead of text")
    g.set_defaults(run=_generate)
    return g


def _add_bench_parser(sub) -> None:
    b = sub.add_parser(
        "bench", help="the BENCH.md end-to-end table for a model directory or a named shape (random weights)",
        description="End-to-end decode benchmark (BENCH.md): the fast engine unsteered and SVGT-steered (each "
                    "refresh mode x interval), HF generate and the eager recompute loop beside; ms/token (mean, "
                    "and per-step p10/median/p90 from a streamed run), tokens/s, prefill, peak memory, % of the "
                    "bandwidth floor, ratios. Writes JSON + PNG with the device, versions, commit and (on a GPU) "
                    "NVML telemetry: SM clock, power, memory.")
    b.add_argument("target", nargs="?", help="model directory, or a named shape: llama3-8b, qwen2.5-0.5b, tiny, tiny8")
    b.add_argument("--value-module", metavar="DIR", help="SVGT module artifact (default: random, K=5)")
    b.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    b.add_argument("--prompt", type=int, default=512, help="prompt length in tokens (default 512)")
    b.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run (default 256)")
    b.add_argument("--modes", default="exact", help="SVGT refresh modes, comma-separated (default exact; e.g. "
                                                    "exact,bridge,project,window=8)")
    b.add_argument("--intervals", default="5", help="refresh intervals, comma-separated (default 5)")
    b.add_argument("--no-baselines", action="store_true", help="skip HF generate and the eager reference")
    b.add_argument("--smoke", action="store_true", help="tiny shape and sizes: checks the harness on CPU in seconds")
    b.add_argument("--out", default=None, help="output directory for JSON + PNG (default $OUT, else .)")
    b.add_argument("--json", action="store_true", help="print the result JSON instead of the table")
    _add_runtime_options(b)
    b.set_defaults(run=_bench)


def _add_train_parser(sub) -> None:
    """`svgt-fast train` comes from train_cli.py; if it cannot be imported the command still exists
    and says so, rather than vanishing."""
    try:
        from .train_cli import add_train_parser
    except Exception as exc:  # missing or broken: the other commands must keep working
        why = f"{type(exc).__name__}: {exc}"
        t = sub.add_parser("train", help="(unavailable) train value modules", add_help=True)
        t.add_argument("rest", nargs=argparse.REMAINDER)

        def unavailable(_args):
            raise CliError(f"train is unavailable in this installation (svgt_fast.train_cli: {why})")

        t.set_defaults(run=unavailable)
        return
    add_train_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svgt-fast", description="Value-guided generation runtime (SVGT, ConVA, NeVA, RE-Control).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.generate_parser = _add_generate_parser(sub)
    _add_bench_parser(sub)

    demo = sub.add_parser("demo", help="offline demo: the built-in world backbone, unsteered vs SVGT-steered, "
                                       "judged by the world's harm rule")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate per prompt")
    demo.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    demo.add_argument("--seed", type=int, default=0, help="sampling seed")
    # The recommended setting for the default module (benchmarks/NOTES.md, "Efficacy recipe"):
    # read the value score every token, steer a row only while it exceeds 0.5.
    demo.add_argument("--policy", choices=("sparse", "always"), default="sparse",
                      help="sparse: a row is steered only while its value score exceeds --score-threshold")
    demo.add_argument("--score-threshold", type=float, default=0.5, help="sparse policy threshold")
    demo.add_argument("--refresh-interval", type=int, default=1, help="SVGT refreshes its bridge every N tokens")
    demo.add_argument("--rate-prompts", type=int, default=64,
                      help="held-out risky prompts for the harmful-rate summary (0 = skip)")
    demo.add_argument("--prompts", nargs="+", default=None,
                      help="prompts to continue, in the world's words (default: built-in risky and benign ones)")
    demo.set_defaults(run=_demo)

    conv = sub.add_parser("convert", help="import the SVGT authors' stage-2/stage-3 .pt checkpoints")
    conv.add_argument("stage2", help="stage-2 checkpoint (value transformer + discriminator)")
    conv.add_argument("stage3", help="stage-3 checkpoint (generator)")
    conv.add_argument("--config", required=True, help="JSON file with the SVGTConfig fields")
    conv.add_argument("--out", required=True, help="output directory (safetensors + JSON)")
    conv.set_defaults(run=_convert)

    _add_train_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["generate"]:  # prompts may come before or after the options
            args = parser.generate_parser.parse_intermixed_args(argv[1:])
            args.command = "generate"
        else:
            args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line already printed)
        return int(exc.code or 0)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"svgt-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error: one line, exit code 2
        if os.environ.get("SVGT_FAST_TRACEBACK") == "1":
            raise
        expected = (CliError, ValueError, TypeError, FileNotFoundError, MemoryError, OSError, RuntimeError)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        what = text if isinstance(exc, expected) and text else f"{type(exc).__name__}: {text}"
        print(f"svgt-fast {args.command}: error: {what}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Plots (and the README headline table) from the result files under benchmarks/results/.

Reads every JSON the benchmarks wrote (`generate_*`, `sparse_*`, `prefix_attention*`, in the
results folder and its per-run subfolders such as h100_2026-11-23_b120f69/) and draws:

  latency_vs_batch.png     decode ms/token against batch, per configuration (generate_*)
  latency_vs_context.png   ms/token against prompt length (generate_*) and the prefix-attention
                           kernel's µs against context (prefix_attention*)
  refresh_modes.png        SVGT time / unsteered per refresh mode and interval (generate_*)
  overhead_vs_trigger.png  time / unsteered against the share of sequences firing (sparse_*)

Each series is labelled with its device and folder; CPU runs (the `--smoke` harness checks) are
marked as such — their times say nothing about speed (BENCH.md). Of two repetitions of a
figure the faster is drawn.

Usage: python benchmarks/plot_results.py [--results DIR] [--out DIR] [--gpu-only] [--markdown]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def load_results(root: str, gpu_only: bool = False) -> list[dict]:
    """Every result file under root: {"name", "folder", "device", "cpu", "data"}."""
    found = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True)):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            continue
        device = (data.get("environment") or {}).get("device", "?")
        cpu = device.startswith("cpu")
        if gpu_only and cpu:
            continue
        folder = os.path.relpath(os.path.dirname(path), root)
        found.append({"name": os.path.splitext(os.path.basename(path))[0], "folder": "" if folder == "." else folder,
                      "device": device, "cpu": cpu, "data": data})
    return found


def label(res: dict) -> str:
    where = res["folder"] or res["name"]
    dev = "CPU harness check" if res["cpu"] else res["device"].replace("NVIDIA ", "")
    return f"{dev} · {where}"


def best(rows: list[dict], key: str = "ms_per_token") -> dict:
    """{(what, batch): the row with the smallest `key`} over repetitions."""
    out = {}
    for r in rows:
        if r.get(key) is None or "what" not in r:
            continue
        k = (r["what"], r.get("batch"))
        if k not in out or r[key] < out[k][key]:
            out[k] = r
    return out


def _figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(max(n_panels, 1), 2)
    rows = -(-max(n_panels, 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    return plt, fig, [ax for row in axes for ax in row]


def _save(plt, fig, axes, used: int, path: str) -> str:
    for ax in axes[used:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _empty(ax, what: str):
    ax.text(0.5, 0.5, f"no {what} results yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_latency_vs_batch(results, out_dir) -> str:
    gens = [r for r in results if r["name"].startswith("generate_")]
    plt, fig, axes = _figure(len(gens))
    for ax, res in zip(axes, gens):
        table = best(res["data"]["rows"])
        for what in sorted({w for w, _ in table}):
            pts = sorted((b, r["ms_per_token"]) for (w, b), r in table.items() if w == what and b is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=what)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("ms / token")
        d = res["data"]
        ax.set_title(f"{d.get('shape', '?')}, prompt {d.get('prompt', '?')}\n{label(res)}", fontsize=8)
        ax.legend(fontsize=6)
    if not gens:
        _empty(axes[0], "generate_*")
    return _save(plt, fig, axes, max(len(gens), 1), os.path.join(out_dir, "latency_vs_batch.png"))


def plot_latency_vs_context(results, out_dir) -> str:
    plt, fig, axes = _figure(2)
    ax = axes[0]
    by_shape = defaultdict(list)  # (device, shape, what, batch) -> [(prompt, ms)]
    for res in (r for r in results if r["name"].startswith("generate_")):
        d = res["data"]
        for (what, b), row in best(d["rows"]).items():
            by_shape[(label(res).split(" · ")[0], d.get("shape"), what, b)].append((d.get("prompt"), row["ms_per_token"]))
    drawn = 0
    for (dev, shape, what, b), pts in sorted(by_shape.items(), key=str):
        pts = sorted(p for p in pts if p[0] is not None)
        if what in ("engine_unsteered", "engine_svgt_exact_k5_r5") and pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{what} B={b} · {shape} · {dev}")
            drawn += 1
    if drawn:
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("ms / token")
        ax.set_yscale("log")
        ax.legend(fontsize=5)
        ax.set_title("end to end: ms/token vs prompt length\n(one point per prompt length measured)", fontsize=8)
    else:
        _empty(ax, "generate_*")
    ax = axes[1]
    kern = [r for r in results if r["name"].startswith("prefix_attention")]
    for res in kern:
        series = defaultdict(dict)  # (kernel, batch) -> {context: fastest µs}
        for row in res["data"]["rows"]:
            if row.get("context") is None or row.get("us") is None:
                continue
            s = series[(row.get("kernel"), row.get("batch"))]
            s[row["context"]] = min(row["us"], s.get(row["context"], float("inf")))
        for (k, b), pts in sorted(series.items(), key=str):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=f"{k} B={b} · {label(res)}")
    if kern:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel("µs per call")
        ax.legend(fontsize=5)
        ax.set_title("prefix attention (decode, one layer)", fontsize=8)
    else:
        _empty(ax, "prefix_attention*")
    return _save(plt, fig, axes, 2, os.path.join(out_dir, "latency_vs_context.png"))


_MODE = re.compile(r"engine_svgt_(?P<mode>.+)_k(?P<k>\d+)_r(?P<r>\d+)$")


def plot_refresh_modes(results, out_dir) -> str:
    gens = [r for r in results if r["name"].startswith("generate_")]
    plt, fig, axes = _figure(len(gens))
    for ax, res in zip(axes, gens):
        rows = [r for r in res["data"]["rows"] if r.get("ratio_vs_unsteered") is not None and _MODE.match(r["what"])]
        table = best(rows, "ratio_vs_unsteered")
        batches = sorted({b for _, b in table})
        names = sorted({w for w, _ in table}, key=lambda w: (_MODE.match(w)["mode"], int(_MODE.match(w)["r"])))
        width = 0.8 / max(len(batches), 1)
        for j, b in enumerate(batches):
            xs = [i + j * width for i in range(len(names))]
            ax.bar(xs, [table[(w, b)]["ratio_vs_unsteered"] if (w, b) in table else 0 for w in names], width,
                   label=f"batch {b}")
        ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels([f"{_MODE.match(w)['mode']}\nK={_MODE.match(w)['k']} every {_MODE.match(w)['r']}"
                            for w in names], fontsize=6)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_ylabel("SVGT time / unsteered")
        ax.set_title(f"{res['data'].get('shape', '?')} · {label(res)}", fontsize=8)
        ax.legend(fontsize=6)
    if not gens:
        _empty(axes[0], "generate_*")
    return _save(plt, fig, axes, max(len(gens), 1), os.path.join(out_dir, "refresh_modes.png"))


_FIRE = re.compile(r"fire_(\d+)pct$")


def plot_overhead_vs_trigger(results, out_dir) -> str:
    sparse = [r for r in results if r["name"].startswith("sparse_")]
    plt, fig, axes = _figure(1)
    ax = axes[0]
    for res in sparse:
        table = best([r for r in res["data"]["rows"] if r.get("ratio_vs_unsteered") is not None], "ratio_vs_unsteered")
        for b in sorted({b for _, b in table}):
            pts = sorted((int(_FIRE.match(w).group(1)), r["ratio_vs_unsteered"]) for (w, bb), r in table.items()
                         if bb == b and _FIRE.match(w))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {b} · {label(res)}")
    if sparse:
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xlabel("% of sequences whose value module fires (policy sparse)")
        ax.set_ylabel("time / unsteered")
        ax.legend(fontsize=6)
        ax.set_title("sparse triggering: overhead vs trigger rate", fontsize=8)
    else:
        _empty(ax, "sparse_*")
    return _save(plt, fig, axes, 1, os.path.join(out_dir, "overhead_vs_trigger.png"))


def headline_markdown(results) -> str:
    """The README headline table from the GPU generate_* results: per batch, unsteered
    ms/token (% of the floor), HF generate, SVGT exact / unsteered, eager loop / SVGT exact."""
    lines = []
    for res in (r for r in results if r["name"].startswith("generate_") and not r["cpu"]):
        d, table = res["data"], best(res["data"]["rows"])
        env = d.get("environment", {})
        batches = sorted({b for _, b in table if b is not None})
        lines.append(f"**{d.get('shape', '?')}**, {env.get('device')}, torch {env.get('torch')}, commit "
                     f"`{(env.get('commit') or '?')[:7]}` (`{res['folder'] or res['name']}`), prompt "
                     f"{d.get('prompt')}, {d.get('new_tokens')} new\n")
        lines.append("| | " + " | ".join(f"batch {b}" for b in batches) + " |")
        lines.append("| --- |" + " --- |" * len(batches))

        def cell(what, fmt):
            out = []
            for b in batches:
                r = table.get((what, b))
                out.append(fmt(r) if r else "—")
            return out

        rows = [
            ("unsteered, ms/token", cell("engine_unsteered", lambda r: f"{r['ms_per_token']:.2f}" + (
                f" ({r['pct_of_floor']:.0f} % of floor)" if r.get("pct_of_floor") else ""))),
            ("HF `generate`, ms/token", cell("hf_generate", lambda r: f"{r['ms_per_token']:.1f} (ours "
                                                                        f"{r.get('engine_speedup', 0):.1f}x faster)")),
        ]
        for what in sorted({w for w, _ in table if _MODE.match(w)}):
            m = _MODE.match(what)
            rows.append((f"SVGT {m['mode']}, K={m['k']}, every {m['r']} / unsteered",
                         cell(what, lambda r: f"{r['ratio_vs_unsteered']:.2f}x")))
        eager = [w for w, _ in table if w.startswith("eager_svgt_reference")]
        for w in sorted(set(eager)):
            rows.append(("eager recompute loop / SVGT exact", cell(w, lambda r: f"{r['engine_svgt_speedup']:.1f}x slower"
                                                                     if r.get("engine_svgt_speedup") else "—")))
        lines += [f"| {name} | " + " | ".join(c) + " |" for name, c in rows]
        lines.append("")
    return "\n".join(lines) if lines else "no GPU generate_* results found"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="folder of result JSON files")
    ap.add_argument("--out", default=None, help="where the PNGs go (default: <results>/plots)")
    ap.add_argument("--gpu-only", action="store_true", help="leave out CPU (--smoke) runs")
    ap.add_argument("--markdown", action="store_true", help="print the README headline table (GPU runs) and exit")
    args = ap.parse_args(argv)
    results = load_results(args.results, args.gpu_only)
    if args.markdown:
        print(headline_markdown(results))
        return 0
    out = args.out or os.path.join(args.results, "plots")
    os.makedirs(out, exist_ok=True)
    for fn in (plot_latency_vs_batch, plot_latency_vs_context, plot_refresh_modes, plot_overhead_vs_trigger):
        print("wrote", fn(results, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

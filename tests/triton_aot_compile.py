"""Compile recorded Triton launches ahead of time for an NVIDIA target, without a GPU.

Usage: python tests/triton_aot_compile.py LAUNCHES.json [--arch 90]
LAUNCHES.json: a list of {module, name, signature, constexprs, options} (tests/test_triton_compile.py
records them from the engine's launches). Run WITHOUT TRITON_INTERPRET: the kernels must be
triton.jit functions, not interpreted ones. Every launch recorded with fp16 data is compiled as
recorded and with bf16 data (the GPU's dtype; Triton's CPU interpreter cannot run bf16 matrix
products, so the recording uses fp16). Prints one line per compile (shared memory per block, and
registers / spill stack from cuobjdump when it is found); exits 1 if any compile fails or needs
more shared memory than an sm_90 block may have.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

MAX_SHARED_SM90 = 227 * 1024  # opt-in shared memory per block on H100 / H200


def variants(launch: dict):
    yield "as recorded", launch["signature"]
    if any(v == "*fp16" for v in launch["signature"].values()):
        yield "bf16", {k: "*bf16" if v == "*fp16" else v for k, v in launch["signature"].items()}


def resources(cubin: bytes) -> str:
    """'REG:n STACK:n' from cuobjdump -res-usage (Triton ships one), or '' when it is missing."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = [w for w in out.split() if w.startswith(("REG:", "STACK:"))]
    return " ".join(fields[:2])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("launches")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter's kernels cannot be compiled")
    target = GPUTarget("cuda", args.arch, 32)
    failures = []
    with open(args.launches) as f:
        launches = json.load(f)
    for launch in launches:
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        consts = {k: v for k, v in launch["constexprs"].items()}
        for label, sig in variants(launch):
            what = f"{launch['name']} [{label}] {json.dumps(consts, sort_keys=True)} {json.dumps(launch['options'])}"
            t0 = time.perf_counter()
            try:
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                   options=launch["options"])
            except Exception as e:  # noqa: BLE001 — every failure is reported, then the exit code
                failures.append(f"{what}: {type(e).__name__}: {str(e).strip()[-2000:]}")
                continue
            shared = k.metadata.shared
            print(f"{time.perf_counter() - t0:5.1f} s  shared {shared:6d}  {resources(k.asm['cubin'])}  {what}")
            if shared > MAX_SHARED_SM90:
                failures.append(f"{what}: {shared} bytes of shared memory > {MAX_SHARED_SM90}")
    for msg in failures:
        print("FAILED", msg, file=sys.stderr)
    print(f"{len(launches)} launches, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then the benchmarks; everything lands in $OUT.
#   device run: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
python3 -m pytest -q -x tests/test_gpu.py tests/test_prefix_attention.py tests/test_engine.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
(cd benchmarks && python3 bench_prefix_attention.py) 2>&1 | tee "$OUT/bench_prefix_attention.log"
(cd benchmarks && python3 bench_generate.py --shape llama3-8b) 2>&1 | tee "$OUT/bench_generate.log"
echo "gpu tests rc=$tests_rc"
exit "$tests_rc"

#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then the benchmarks; everything lands in $OUT.
#   device run: bash benchmarks/gpu_check.sh            (all steps)
#               STEPS="tests prefix" bash benchmarks/gpu_check.sh   (a subset)
# Each step has its own time limit so that one hang cannot eat the whole lease. All steps take
# about 16 minutes; where one device call is limited to 10, split it in two calls:
#   STEPS="tests prefix kvpatch trigger profile" ...   then   STEPS="generate sparse interventions generate_r1" ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1
STEPS=${STEPS:-"tests prefix kvpatch trigger profile generate sparse interventions generate_r1"}
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
rc=0
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name"; local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local r=${PIPESTATUS[0]}
  echo "== $name rc=$r in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  [ "$r" -eq 0 ] || rc=1
}
step tests 300 python3 -m pytest -q -p no:cacheprovider -s tests/test_gpu.py tests/test_prefix_attention.py \
  tests/test_fused_kernels.py tests/test_kv_patch.py tests/test_trigger.py tests/test_conva.py tests/test_neva.py
step prefix 150 python3 benchmarks/bench_prefix_attention.py
step kvpatch 90 python3 benchmarks/bench_kv_patch.py
step trigger 60 python3 benchmarks/bench_trigger.py
step profile 120 python3 benchmarks/profile_decode.py --batch 1
step generate 300 python3 benchmarks/bench_generate.py --shape llama3-8b --modes exact,bridge,project,window=8 --intervals 5
step sparse 200 python3 benchmarks/bench_sparse.py
step interventions 200 python3 benchmarks/bench_interventions.py
step generate_r1 150 python3 benchmarks/bench_generate.py --shape llama3-8b --modes exact,bridge --intervals 1 \
  --no-baselines --tag _r1
cat "$OUT/summary.txt"
exit "$rc"

#!/usr/bin/env bash
# The CPU speed tables of docs/benchmarks.md: each benchmark under an exclusive hold of the project's CPU lock
# (so no other benchmark or test of ours runs beside it). Usage: scripts/bench_cpu.sh OUTDIR [NAME...]
set -euo pipefail
out=${1:?usage: scripts/bench_cpu.sh OUTDIR [NAME...]}; shift
mkdir -p "$out"
bench() {  # NAME ARGS...: one run, its markdown table in OUTDIR/NAME.md
  local name=$1; shift
  echo "== $name: densenet bench speed $*" >&2
  { echo "\`densenet bench speed $*\`"; echo; flock -x /tmp/densenet-cpu.lock .venv/bin/densenet bench speed "$@"; } \
    > "$out/$name.md" 2> "$out/$name.err"
}
want() { [ $# -eq 0 ] || [[ " ${SELECTED} " == *" $1 "* ]]; }
SELECTED="$*"
want bc100-fp32 && bench bc100-fp32 --model densenet_bc100_k12 --repeats 5 --profile
want bc100-bf16-cl && bench bc100-bf16-cl --model densenet_bc100_k12 --precision bf16 --channels-last --tasks train --repeats 5
want bc100-cl && bench bc100-cl --model densenet_bc100_k12 --channels-last --tasks train --repeats 5
want bc100-memeff && bench bc100-memeff --model densenet_bc100_k12 --memory-efficient --tasks train --repeats 5
want bc100-ort && bench bc100-ort --model densenet_bc100_k12 --engine onnxruntime --tasks infer latency --repeats 5
want bc100-int8 && bench bc100-int8 --model densenet_bc100_k12 --engine onnxruntime-int8 --tasks infer latency --repeats 5
want d121-fp32 && bench d121-fp32 --model densenet121 --tasks train --repeats 3 --warmup 1 --profile
want d121-bf16-cl && bench d121-bf16-cl --model densenet121 --precision bf16 --channels-last --tasks train --repeats 3 --warmup 1
want d121-ort && bench d121-ort --model densenet121 --engine onnxruntime --tasks infer latency --repeats 3 --warmup 1
exit 0

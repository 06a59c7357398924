#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md, one script of under 8 minutes on one GPU:
#   1. densenet bench speed (ours vs torchvision, interleaved) for DenseNet-BC-100 k=12 and DenseNet-121 in
#      fp32, bf16 autocast, channels_last, bf16 + channels_last, and torch.compile (BC-100 training);
#   2. one epoch of DenseNet-BC-100 k=12 on the real CIFAR-10 (wall time), then a short run's test error.
#
#   scripts/gpu_bench.sh OUTDIR            # on a CUDA machine (the CIFAR-10 tarball is looked for beside it)
#   scripts/gpu_bench.sh OUTDIR --tiny     # the same steps on the CPU with tiny sizes: checks the script
#
# Each step has its own time limit, so one slow step (a long compile) cannot eat the others' time; a step
# that fails or times out is recorded in OUTDIR/summary.md and the script goes on.
set -uo pipefail
out=${1:?usage: scripts/gpu_bench.sh OUTDIR [--tiny]}
tiny=${2:-}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
summary="$out/summary.md"
echo "# GPU benchmark $(date -u '+%Y-%m-%d %H:%M UTC')" > "$summary"
"$py" -c "import torch; print('torch', torch.__version__, '| device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" >> "$summary" 2>&1

if [ "$tiny" = "--tiny" ]; then
  device=cpu; models="densenet_bc16_k4"; sizes=(--input-size 8 --batch-size 4 --infer-batch-size 4 --repeats 1
  --warmup 0 --matmul-size 256); limit=120
  train=(--dataset digits --model densenet_bc16_k4 --epochs 1 --batch-size 64 --device cpu)
  short=(--dataset digits --model densenet_bc16_k4 --epochs 2 --batch-size 64 --device cpu)
else
  device=cuda; models="densenet_bc100_k12 densenet121"; sizes=(--repeats 10 --warmup 3 --matmul-size 8192); limit=60
  data=data/cifar10
  if [ ! -d "$data/test" ]; then
    for tar in shared/data/cifar10/cifar10-jpeg.tar.gz ../shared/data/cifar10/cifar10-jpeg.tar.gz; do
      [ -f "$tar" ] && mkdir -p data && tar xzf "$tar" -C data && break
    done
  fi
  train=(--dataset cifar10 --data-dir "$data" --model densenet_bc100_k12 --epochs 1 --batch-size 64 --device cuda
  --amp bf16 --channels-last --workers 4)
  short=(--dataset cifar10 --data-dir "$data" --model densenet_bc100_k12 --epochs 4 --milestones 2 3 --batch-size 64
  --device cuda --amp bf16 --channels-last --workers 4)
fi

step() {  # NAME LIMIT COMMAND...: run with a time limit, log to OUTDIR/NAME.log, note the outcome
  local name=$1 seconds=$2; shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "- $name: exit $rc after $((SECONDS - start)) s: \`$*\`" >> "$summary"
}

for model in $models; do
  for mode in "fp32" "bf16" "fp32-cl" "bf16-cl"; do
    flags=(--precision "${mode%%-*}"); [[ $mode == *-cl ]] && flags+=(--channels-last)
    step "speed-$model-$mode" "$limit" "$py" -m densenet bench speed --model "$model" --device "$device" \
      "${flags[@]}" "${sizes[@]}" --markdown
  done
done
first=${models%% *}
step "speed-$first-compile" $((limit * 5 / 2)) "$py" -m densenet bench speed --model "$first" --device "$device" \
  --compile --channels-last --tasks train "${sizes[@]}" --markdown
step "epoch-bc100" 90 "$py" -m densenet train "${train[@]}" --out "$out/run-epoch" --quiet
step "short-run-bc100" 150 "$py" -m densenet train "${short[@]}" --out "$out/run-short" --quiet
for name in "$out"/speed-*.log; do echo; echo "## $(basename "$name" .log)"; grep -v "^WARNING" "$name"; done >> "$summary"
for name in epoch-bc100 short-run-bc100; do
  echo; echo "## $name (last lines of its log)"; tail -n 8 "$out/$name.log"
done >> "$summary"
cat "$summary"

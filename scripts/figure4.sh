#!/usr/bin/env bash
# The paper's Figure 4 at a fixed CPU budget (docs/figure4.md): every network of configs/figure4/ trained under
# one recipe, one network at a time, then the figure drawn from the run folders.
#
#   scripts/figure4.sh                          # every network, in ORDER below, then the figure (hours: docs/figure4.md)
#   scripts/figure4.sh resnet56_cifar           # one network (a configs/figure4/NAME.yaml), then the figure
#   DATA_DIR=../shared/data/cifar10 RUNS=runs/figure4 KEEP=docs/runs/figure4 OUT=docs/figure4 scripts/figure4.sh
#   scripts/figure4.sh --estimate               # each network's few-step img/s, for docs/figure4.md's estimate
#
# A finished run's record (config.yaml, metrics.csv, train.log, curves.png: no weights) is copied to KEEP/NAME, the
# committed copy the figure is drawn from; a network with such a copy is finished, on any clone of the project.
# Resumable: a network whose run folder holds model.safetensors is skipped; one with a checkpoint continues from
# it (densenet train --resume, after the last finished epoch); one not started, or killed before its first
# checkpoint, starts. Each run's output is appended to RUN/train.log (the figure reads its image count there),
# between two lines naming the CPU and its fp32 matmul peak just before and just after the run (the figure's
# table shows them: a series split across machines, or a run disturbed by another process, shows there).
# Each run holds the project's CPU lock (/tmp/densenet-cpu.lock, as scripts/bench_cpu.sh) from the first peak
# to the last, so no benchmark of ours runs beside it (`flock -x /tmp/densenet-cpu.lock CMD` waits for the run
# to end, and the series for CMD): its minutes and img/s are part of the figure. Run the series on one machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DENSENET=${DENSENET:-.venv/bin/densenet}
[ -x "$DENSENET" ] || DENSENET=densenet
DATA_DIR=${DATA_DIR:-data/cifar10}
RUNS=${RUNS:-runs/figure4}
KEEP=${KEEP:-docs/runs/figure4}
OUT=${OUT:-docs/figure4}
LOCK=${LOCK:-/tmp/densenet-cpu.lock}
PYTHON=${PYTHON:-$(dirname "$DENSENET")/python}
[ -x "$PYTHON" ] || PYTHON=python
# The order of a full series: DenseNet-BC L=40 k=12 and the ResNets up to ResNet-56 first, then the next
# DenseNet-BC, so that a series cut short still compares the two families (the paper's Figure 4 middle); then
# the variants at L=40 k=12 (Figure 4 left), the widest DenseNet-BC, and ResNet-110 last (the issue's optional point).
ORDER=(densenet_bc40_k12 resnet20_cifar resnet32_cifar resnet56_cifar densenet_bc64_k12 densenet_b40_k12
       densenet40_k12 densenet_bc40_k24 resnet110_cifar)

if [ "${1:-}" = "--estimate" ]; then
  # One thread, eager fp32, channels_last, batch 64, 32x32: three interleaved rounds of two training steps of
  # every network, the best round kept (a step slowed by another process counts least). Only the ratios to
  # the first network mean much; docs/figure4.md scales them by a measured run.
  exec "$PYTHON" - "${ORDER[@]}" <<'EOF'
import sys, time
import torch
from densenet.models import create_model
from densenet.training.fast import sgd_step
torch.set_num_threads(1)
steps, best = {}, {}
for name in sys.argv[1:]:
    model = create_model(name).train().to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    steps[name] = sgd_step(model, x, torch.randint(0, 10, (64,)), torch.device("cpu"), "none")
    steps[name]()  # warm-up
    best[name] = 0.0
for _ in range(3):
    for name, step in steps.items():
        start = time.perf_counter()
        step(), step()
        best[name] = max(best[name], 128 / (time.perf_counter() - start))
first = next(iter(best.values()))
for name, rate in best.items():
    print(f"{name:<20} {rate:7.1f} img/s  cost {first / rate:.2f}x {next(iter(best))}")
EOF
fi

names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ORDER[@]}")
for name in "${names[@]}"; do
  [ -f "configs/figure4/$name.yaml" ] || { echo "figure4.sh: no configs/figure4/$name.yaml (choose from:" \
                                                "${ORDER[*]})" >&2; exit 2; }
done
machine() {  # "machine: CPU MODEL, fp32 matmul peak N GFLOP/s (...)": the yardstick beside the run's minutes
  "$PYTHON" - "$1" <<'EOF' || echo "machine: (no matmul peak: the measurement failed)"
import sys
import torch
from densenet.devices import cpu_model, matmul_peak
peak = matmul_peak(torch.device("cpu"), "fp32") / 1e9
print(f"machine: {cpu_model()}, fp32 matmul peak {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads, {sys.argv[1]})")
EOF
}
# The CPU lock on fd 9, where flock exists (elsewhere the series runs unlocked).
if command -v flock >/dev/null; then exec 9>"$LOCK"; lock() { flock "$1" 9; }; else lock() { :; }; fi
for name in "${names[@]}"; do
  run=$RUNS/$name
  lock -x  # before looking: a run of this network may be going
  if [ -f "$run/model.safetensors" ] || [ -f "$KEEP/$name/metrics.csv" ]; then
    echo "== $name: finished ($run or $KEEP/$name), skipped"
    lock -u
    continue
  fi
  if [ -f "$run/checkpoint_last.pt" ]; then
    args=(train --resume "$run")
  else
    args=(train --config "configs/figure4/$name.yaml" --data-dir "$DATA_DIR" --out "$run")
  fi
  mkdir -p "$run"
  echo "== $name: $DENSENET ${args[*]}  ($(date -u '+%F %T') UTC)"
  machine "before the run" | tee -a "$run/train.log"
  "$DENSENET" "${args[@]}" 2>&1 | tee -a "$run/train.log"
  machine "after the run" | tee -a "$run/train.log"
  if [ -f "$run/model.safetensors" ]; then  # finished: its record to KEEP
    mkdir -p "$KEEP/$name"
    for file in config.yaml metrics.csv train.log curves.png; do
      if [ -f "$run/$file" ]; then cp "$run/$file" "$KEEP/$name/"; fi
    done
  fi
  lock -u
done

# The figure from every network with results so far: its finished record in KEEP, else its run folder (an
# unfinished run is drawn hollow and marked in the table).
runs=()
for name in "${ORDER[@]}"; do
  if [ -f "$KEEP/$name/metrics.csv" ]; then
    runs+=("$KEEP/$name")
  elif [ -f "$RUNS/$name/metrics.csv" ]; then
    runs+=("$RUNS/$name")
  fi
done
if [ ${#runs[@]} -gt 0 ]; then
  "$DENSENET" analyze figure4 "${runs[@]}" --out "$OUT"
fi

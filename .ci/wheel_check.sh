#!/usr/bin/env bash
# The package as a user installs it (`make wheel-check`, run by .ci/run):
#   1. `python -m build` makes the sdist and, from it, the wheel; `twine check --strict` accepts both;
#   2. a clean venv gets torch and torchvision at constraints.txt's versions first, as a user's own torch;
#   3. the wheel goes in beside them, its other dependencies at constraints.txt's versions but torch, torchvision
#      and their CUDA packages left free, so that a requirement that does not accept the installed torch would
#      make pip change it; pip's install report and `pip freeze` before and after must show it changed nothing;
#   4. the installed command and package answer (`densenet --version`, `densenet list`, an import from outside
#      the source tree).
# Needs build and twine in .venv (`make wheel-check` installs them: the `dist` extra). Work folder: build/wheel-check.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
bin=.venv/bin
work=build/wheel-check
venv=$work/venv
torch_like='^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)=='
rm -rf "$work" dist
mkdir -p "$work"
clock() { echo "wheel-check: $1 ($((SECONDS - start)) s)"; }
start=$SECONDS

"$bin/python" -m build --outdir dist . > "$work/build.log" 2>&1 || { tail -n 30 "$work/build.log"; exit 1; }
ls dist
"$bin/twine" check --strict dist/*
clock "built and checked"

"$python" -m venv "$venv"
"$venv/bin/pip" install -q -c constraints.txt torch torchvision
"$venv/bin/pip" freeze --all > "$work/freeze-before.txt"
clock "clean venv with $(grep -E '^torch(vision)?==' "$work/freeze-before.txt" | tr '\n' ' ')"

grep -vE "$torch_like" constraints.txt > "$work/constraints-free-torch.txt"
wheel=$(ls dist/*.whl)
"$venv/bin/pip" install -q --dry-run --report "$work/report.json" -c "$work/constraints-free-torch.txt" "$wheel"
"$venv/bin/python" - "$work/report.json" "$torch_like" <<'EOF'
import json, re, sys
report, pattern = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
touched = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"]
           if pattern.match(f"{i['metadata']['name'].lower()}==")]
if touched:
    sys.exit(f"wheel-check: installing the wheel would change {', '.join(touched)}")
print(f"wheel-check: pip's report installs {len(report['install'])} packages, none of torch's")
EOF
"$venv/bin/pip" install -q -c "$work/constraints-free-torch.txt" "$wheel"
"$venv/bin/pip" freeze --all > "$work/freeze-after.txt"
if ! diff <(grep -E "$torch_like" "$work/freeze-before.txt") <(grep -E "$torch_like" "$work/freeze-after.txt"); then
  echo "wheel-check: installing the wheel changed torch's packages (above)" >&2
  exit 1
fi
clock "wheel installed, torch untouched"

(
  cd "$work"  # away from src/: the installed package must answer, not the source tree
  venv=$PWD/venv
  "$venv/bin/densenet" --version
  "$venv/bin/densenet" list > list.txt && head -n 3 list.txt
  "$venv/bin/python" -c "
import sys, densenet
from densenet.models import create_model
assert densenet.__file__.startswith(sys.prefix), densenet.__file__
create_model('densenet_bc16_k4', num_classes=10)
print('wheel-check: imported', densenet.__file__)"
)
clock "done"

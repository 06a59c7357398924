"""``densenet bench memory``: peak training-step memory and step time, standard vs memory-efficient mode.

For each model (default DenseNet-BC k=12 at depths 40, 100, 160, 250, and DenseNet-BC-250 k=24) and each
mode -- ours standard, ours memory-efficient, torchvision's ``memory_efficient`` DenseNet (gradient
checkpointing) and torchvision's standard DenseNet, both built to the same architecture -- it measures

- memory: in a FRESH subprocess per (model, mode), one SGD training step (zero_grad(set_to_none), forward,
  cross-entropy, backward, SGD-momentum update) after one warm-up step. Reported: peak RSS during the step
  (VmHWM, reset just before it through /proc/self/clear_refs) minus the RSS just before it. That is the
  activations plus the gradients (freed between steps by set_to_none) plus temporaries: the memory a step
  needs beyond the model, optimizer state and the input batch. glibc is told to mmap every allocation over
  64 KiB (mallopt M_MMAP_THRESHOLD), so freed tensors go back to the system at once and RSS follows the
  live tensors rather than the allocator's cache. On CUDA: torch.cuda.max_memory_allocated instead.
- time: in one subprocess per model, all modes built side by side and stepped interleaved (A B C D A B ...)
  after a warm-up round, default allocator; the median seconds per step of --repeats rounds.

Results accumulate in a JSON file (so the benchmark can be run in pieces); the Markdown table and the plot
of memory against depth are rewritten from all its records each run.

    densenet bench memory                                    # the full default set (about 15 minutes)
    densenet bench memory --depths 40 100 --growth-rate 12 --batch-size 16
    densenet bench memory --models densenet_bc250_k24 --batch-size 64 --modes efficient --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("standard", "efficient", "torchvision-efficient", "torchvision")
DEFAULT_MODELS = ("densenet_bc40_k12", "densenet_bc100_k12", "densenet_bc160_k12", "densenet_bc250_k12",
                  "densenet_bc250_k24")
LABELS = {"standard": "ours, standard", "efficient": "ours, memory-efficient",
          "torchvision-efficient": "torchvision memory_efficient", "torchvision": "torchvision standard"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help="model names (default: DenseNet-BC k=12 at depths 40 100 160 250, and BC-250 k=24)")
    parser.add_argument("--depths", nargs="+", type=int, default=None,
                        help="DenseNet-BC depths (6n+4); with --growth-rate, instead of --models")
    parser.add_argument("--growth-rate", nargs="+", type=int, default=[12], help="growth rates for --depths")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per measurement (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per model (0: memory only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=Path("docs/memory.json"),
                        help="JSON file the measurements accumulate in (default docs/memory.json)")
    parser.add_argument("--markdown", type=Path, default=Path("docs/memory.md"))
    parser.add_argument("--plot", type=Path, default=Path("docs/memory.png"))


def model_names(args: argparse.Namespace) -> list[str]:
    if args.depths:
        names = [f"densenet_bc{d}_k{k}" for k in args.growth_rate for d in args.depths]
    else:
        names = list(args.models or DEFAULT_MODELS)
    from densenet.models.registry import create_model

    for name in names:  # fail before measuring anything
        create_model(name, num_classes=10)
    return names


def run(args: argparse.Namespace) -> int:
    from densenet.errors import ConfigError

    if args.batch_size <= 0 or args.threads <= 0 or args.repeats < 0 or args.input_size < 8:
        raise ConfigError("--batch-size and --threads must be positive, --repeats >= 0, --input-size >= 8")
    names = model_names(args)
    command = "densenet bench memory " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "memory"] else [])
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    records = []
    for name in names:
        common = dict(model=name, batch=args.batch_size, size=args.input_size, threads=args.threads,
                      device=args.device)
        memory = {mode: _subprocess("memory", dict(common, mode=mode)) for mode in args.modes}
        times = _subprocess("time", dict(common, modes=args.modes, repeats=args.repeats)) if args.repeats else {}
        for mode in args.modes:
            record = dict(common, mode=mode, command=command.strip(), date=date, **memory[mode],
                          seconds_per_step=times.get(mode))
            records.append(record)
            print(_line(record), flush=True)
        # Written after every model, so that an interrupted run keeps what it measured.
        all_records = _merge(args.results, records)
        _write(args.markdown, format_markdown(all_records))
        if args.plot:
            plot(all_records, args.plot)
    print(f"wrote {args.results}, {args.markdown}" + (f", {args.plot}" if args.plot else ""))
    return 0


def _line(r: dict) -> str:
    t = f"{r['seconds_per_step']:.2f} s/step" if r.get("seconds_per_step") else "-"
    return f"{r['model']:<22} batch {r['batch']:<4} {r['mode']:<22} {r['step_mb']:>9.0f} MB  {t}"


# --- measurement, in fresh subprocesses ---------------------------------------------------------------


def _subprocess(kind: str, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    code = "import sys, densenet.bench.memory as m; m._worker(sys.argv[1], sys.argv[2])"
    out = subprocess.run([sys.executable, "-c", code, kind, json.dumps(spec)], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        from densenet.errors import DenseNetError

        tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
        raise DenseNetError(f"{kind} measurement of {spec['model']} failed (exit {out.returncode}): {tail[0]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(name: str, mode: str):
    """Our model in the given mode, or torchvision's DenseNet with the same architecture and CIFAR stem."""
    from densenet.models.registry import create_model

    ours = create_model(name, num_classes=10, memory_efficient=mode == "efficient")
    if not mode.startswith("torchvision"):
        return ours
    import torchvision
    from torch import nn

    cfg = ours.config
    k = cfg["growth_rate"]
    model = torchvision.models.DenseNet(growth_rate=k, block_config=tuple(cfg["block_config"]),
                                        num_init_features=cfg["num_init_features"], bn_size=cfg["bottleneck_width"],
                                        num_classes=10, memory_efficient=mode == "torchvision-efficient")
    model.features.conv0 = nn.Conv2d(3, cfg["num_init_features"], 3, padding=1, bias=False)
    del model.features.norm0, model.features.relu0, model.features.pool0
    return model


def _rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _worker(kind: str, spec_json: str) -> None:
    import ctypes

    spec = json.loads(spec_json)
    if kind == "memory" and spec["device"] == "cpu":
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (see the module docstring)
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    modes = spec["modes"] if kind == "time" else [spec["mode"]]
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"], device=device)
    y = torch.randint(0, 10, (spec["batch"],), device=device)
    steps = {mode: _step_fn(build(spec["model"], mode).to(device), x, y) for mode in modes}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if kind == "memory":
        step = steps[spec["mode"]]
        step()  # warm-up: gradients, momentum buffers, one-time allocations
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = _rss()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        step()
        sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss("VmHWM")
        print(json.dumps(dict(step_mb=(peak - base) / 2**20, before_mb=base / 2**20, peak_mb=peak / 2**20,
                              memory_step_seconds=seconds)))
        return
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(spec["repeats"] + 1):
        for mode in modes:
            sync()
            start = time.perf_counter()
            steps[mode]()
            sync()
            if round_:  # round 0 is the warm-up
                samples[mode].append(time.perf_counter() - start)
    print(json.dumps({mode: statistics.median(s) for mode, s in samples.items()}))


def _step_fn(model, x, y):
    import torch
    import torch.nn.functional as F

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


# --- reporting ----------------------------------------------------------------------------------------


def _merge(path: Path, records: list[dict]) -> list[dict]:
    old = json.loads(path.read_text()) if path.exists() else []
    key = lambda r: (r["model"], r["batch"], r["size"], r["mode"], r["device"], r["threads"])  # noqa: E731
    new_keys = {key(r) for r in records}
    merged = [r for r in old if key(r) not in new_keys] + records
    merged.sort(key=lambda r: (r["device"], r["batch"], _growth(r["model"]), _depth(r["model"]),
                               MODES.index(r["mode"])))
    _write(path, json.dumps(merged, indent=1) + "\n")
    return merged


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _depth(name: str) -> int:
    return int(name.split("_k")[0].rsplit("bc", 1)[-1].rsplit("densenet", 1)[-1] or 0)


def _growth(name: str) -> int:
    return int(name.rsplit("_k", 1)[-1]) if "_k" in name else 0


HEADER = """# Training memory: standard vs memory-efficient DenseNet

Written by `densenet bench memory` (src/densenet/bench/memory.py); rerun it to refresh this file.

- **step memory**: in a fresh process per (model, mode), after one warm-up training step: the peak RSS during
  one training step (SGD with momentum; zero_grad(set_to_none=True), forward, cross-entropy, backward, update)
  minus the RSS just before it. That is activations + gradients + temporaries, i.e. what a step needs beyond
  the model, its optimizer state and the input batch. glibc mmaps every allocation over 64 KiB
  (`mallopt(M_MMAP_THRESHOLD)`), so freed tensors leave RSS at once and it follows the live tensors.
- **s/step**: median of the timed rounds in one process holding all modes, stepped interleaved after a warm-up
  round (default allocator). CPU, 32x32 inputs, 10 classes, fp32, `--threads` torch threads.
- Modes: ours standard (`memory_efficient=False`), ours memory-efficient (shared buffer, BN-ReLU recomputed),
  torchvision's `DenseNet(memory_efficient=True)` (gradient checkpointing) and torchvision's standard DenseNet,
  both with the stem replaced by one 3x3 convolution: the same architecture and parameters as ours.

"""


def format_markdown(records: list[dict]) -> str:
    lines = ["| model | batch | mode | step memory (MB) | vs ours standard | s/step | speed vs ours standard |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in records:
        base = next((b for b in records if b["mode"] == "standard" and
                     all(b[k] == r[k] for k in ("model", "batch", "size", "device", "threads"))), None)
        mem_ratio = f"{r['step_mb'] / base['step_mb']:.0%}" if base else "-"
        t = r.get("seconds_per_step")
        speed = f"{base['seconds_per_step'] / t:.2f}x" if base and t and base.get("seconds_per_step") else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {LABELS[r['mode']]} | {r['step_mb']:.0f} | {mem_ratio} | "
                     f"{f'{t:.2f}' if t else '-'} | {speed} |")
    runs = sorted({(r["date"], r["command"]) for r in records})
    lines += ["", "Measured by:", ""] + [f"- {date}: `{cmd}`" for date, cmd in runs]
    return HEADER + "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups = sorted({(r["batch"], _growth(r["model"])) for r in records})
    for batch, k in groups:
        for mode in MODES:
            pts = sorted((_depth(r["model"]), r["step_mb"]) for r in records
                         if r["mode"] == mode and r["batch"] == batch and _growth(r["model"]) == k)
            if len(pts) >= 2:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{LABELS[mode]} (k={k}, batch {batch})")
    ax.set_xlabel("depth (DenseNet-BC)")
    ax.set_ylabel("training-step memory (MB)")
    ax.set_title("Peak memory of one training step, CPU")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)

"""``densenet bench memory``: peak training-step memory and step time, standard vs memory-efficient mode.

For each model (default DenseNet-BC k=12 at depths 40, 100, 160, 250, and DenseNet-BC-250 k=24) and each
mode -- ours with each dense block implementation (``standard`` is block_impl "plain", then "concat_free"
and "efficient"), torchvision's ``memory_efficient`` DenseNet (gradient checkpointing) and torchvision's
standard DenseNet, both built to the same architecture, and for volumes and signals MONAI's DenseNet121/169/
201/264 as it is and with MONAI's ActivationCheckpointWrapper around each dense layer -- it measures

- memory, first what a user sees: in a FRESH subprocess per (model, mode), under the DEFAULT allocator,
  the peak RSS over two SGD training steps (zero_grad(set_to_none), forward, cross-entropy, backward,
  SGD-momentum update) minus the RSS after building the model and the batch (VmHWM, reset through
  /proc/self/clear_refs just after the build). That includes the gradients, the momentum buffers, one-time
  allocations of the first step, and whatever freed memory the allocator keeps instead of returning it:
  the process's real cost. On CUDA: torch.cuda.max_memory_reserved (what the caching allocator holds).
- memory, second, the live tensors: the same in another fresh subprocess with glibc told to mmap every
  allocation over 64 KiB (mallopt M_MMAP_THRESHOLD), so freed tensors go back to the system at once and
  RSS follows the live tensors rather than the allocator's cache (about 40% slower steps; nobody trains
  like this). On CUDA: torch.cuda.max_memory_allocated, from the same run.
- time: in one subprocess per model, all modes built side by side and stepped interleaved (A B C D A B ...)
  after a warm-up round, default allocator; the median seconds per step of --repeats rounds.

Results accumulate in a JSON file (so the benchmark can be run in pieces); the Markdown table and the plot
of memory against depth are rewritten from all its records each run, and the Markdown file's hand-written
part, from its "## Notes" heading on, is kept.

    densenet bench memory                                    # the full default set (about 15 minutes)
    densenet bench memory --depths 40 100 --growth-rate 12 --batch-size 16
    densenet bench memory --models densenet_bc250_k24 --batch-size 64 --modes efficient --repeats 1
    densenet bench memory --models densenet121 --spatial-dims 3 --input-size 64 --in-chans 1 --batch-size 2

``--spatial-dims 3`` measures volumes (N, in_chans, S, S, S); ``1`` signals (N, in_chans, S). torchvision's modes
are 2D only, MONAI's are for its four ImageNet-form networks (densenet121/169/201/264, which it builds with the
same layers and parameters as ours, tests/models/test_monai_parity.py) and need ``pip install monai``.
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

MODES = ("standard", "concat_free", "efficient", "torchvision-efficient", "torchvision", "monai-checkpoint",
         "monai")
# Our modes -> the model's block_impl (models/densenet.py): "standard" is the plain concatenation.
BLOCK_IMPL = {"standard": "plain", "concat_free": "concat_free", "efficient": "efficient"}
DEFAULT_MODES = {2: ("standard", "efficient", "torchvision-efficient", "torchvision"),
                 1: ("standard", "concat_free", "efficient", "monai-checkpoint", "monai"),
                 3: ("standard", "concat_free", "efficient", "monai-checkpoint", "monai")}
DEFAULT_MODELS = ("densenet_bc40_k12", "densenet_bc100_k12", "densenet_bc160_k12", "densenet_bc250_k12",
                  "densenet_bc250_k24")
MONAI_MODELS = {"densenet121": "DenseNet121", "densenet169": "DenseNet169", "densenet201": "DenseNet201",
                "densenet264": "DenseNet264"}
LABELS = {"standard": "ours, standard", "concat_free": "ours, concat-free", "efficient": "ours, memory-efficient",
          "torchvision-efficient": "torchvision memory_efficient", "torchvision": "torchvision standard",
          "monai-checkpoint": "MONAI, checkpointed layers", "monai": "MONAI standard"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help="model names (default: DenseNet-BC k=12 at depths 40 100 160 250, and BC-250 k=24)")
    parser.add_argument("--depths", nargs="+", type=int, default=None,
                        help="DenseNet-BC depths (6n+4); with --growth-rate, instead of --models")
    parser.add_argument("--growth-rate", nargs="+", type=int, default=[12], help="growth rates for --depths")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="standard (block_impl plain), concat_free, efficient, torchvision-efficient, torchvision "
                             "(2D only), monai-checkpoint, monai (densenet121/169/201/264; default: the torchvision "
                             "ones in 2D, the MONAI ones in 1D and 3D, all of ours but concat_free in 2D)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=32, help="side of the image, volume or signal")
    parser.add_argument("--spatial-dims", type=int, choices=(1, 2, 3), default=2,
                        help="2: images (default); 3: volumes (N, C, S, S, S); 1: signals (N, C, S)")
    parser.add_argument("--in-chans", type=int, default=3, help="input channels (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per measurement (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per model (0: memory only)")
    parser.add_argument("--no-live", action="store_true",
                        help="skip the live-tensor (mmap threshold 64 KiB) measurement on CPU")
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
        create_model(name, num_classes=10, spatial_dims=args.spatial_dims, in_chans=args.in_chans)
    return names


def check_modes(names: list[str], modes: list[str], spatial_dims: int) -> None:
    """A ConfigError before anything is measured when a mode cannot build one of the models."""
    from densenet.errors import ConfigError

    if spatial_dims != 2 and any(m.startswith("torchvision") for m in modes):
        raise ConfigError(f"torchvision's DenseNet is 2D only; with --spatial-dims {spatial_dims} choose among "
                          f"standard, concat_free, efficient, monai-checkpoint, monai")
    if any(m.startswith("monai") for m in modes):
        other = [n for n in names if n not in MONAI_MODELS]
        if other:
            raise ConfigError(f"MONAI builds {', '.join(MONAI_MODELS)} only, not {', '.join(other)}; drop the monai "
                              f"modes or those models")
        try:
            import monai.networks.nets  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"the monai modes need MONAI: pip install monai ({exc})") from exc


def run(args: argparse.Namespace) -> int:
    from densenet.devices import cpu_model
    from densenet.errors import ConfigError

    if (args.batch_size <= 0 or args.threads <= 0 or args.repeats < 0 or args.input_size < 8
            or args.in_chans <= 0):
        raise ConfigError("--batch-size, --threads and --in-chans must be positive, --repeats >= 0, "
                          "--input-size >= 8")
    names = model_names(args)
    args.modes = list(args.modes or DEFAULT_MODES[args.spatial_dims])
    check_modes(names, args.modes, args.spatial_dims)
    command = "densenet bench memory " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "memory"] else [])
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    records = []
    for name in names:
        common = dict(model=name, batch=args.batch_size, size=args.input_size, threads=args.threads,
                      device=args.device, spatial_dims=args.spatial_dims, in_chans=args.in_chans)
        memory = {mode: _measure_memory(dict(common, mode=mode), live=not args.no_live) for mode in args.modes}
        timed = _subprocess("time", dict(common, modes=args.modes, repeats=args.repeats)) if args.repeats else {}
        times, peaks = timed.get("seconds", {}), timed.get("matmul_peak_gflops")
        for mode in args.modes:
            record = dict(common, mode=mode, command=command.strip(), date=date, cpu=cpu_model(), **memory[mode],
                          seconds_per_step=times.get(mode), matmul_peak_gflops=peaks)
            records.append(record)
            print(_line(record), flush=True)
        # Written after every model, so that an interrupted run keeps what it measured.
        all_records = _merge(args.results, records)
        _write(args.markdown, format_markdown(all_records) + kept_notes(args.markdown))
        if args.plot:
            plot(all_records, args.plot)
    print(f"wrote {args.results}, {args.markdown}" + (f", {args.plot}" if args.plot else ""))
    return 0


def _line(r: dict) -> str:
    t = f"{r['seconds_per_step']:.2f} s/step" if r.get("seconds_per_step") else "-"
    live = f"{r['live_mb']:.0f}" if r.get("live_mb") is not None else "-"
    first, second = (("max reserved", "max allocated") if r["device"].startswith("cuda") else
                     ("peak RSS (default allocator)", "live tensors (mmap threshold)"))
    return (f"{r['model']:<22} {_input(r):<10} batch {r['batch']:<4} {r['mode']:<22} {first} {r['peak_mb']:>7.0f} MB  "
            f"{second} {live:>6} MB  {t}")


def _measure_memory(spec: dict, live: bool) -> dict:
    """The user's figure (default allocator) and, unless skipped, the live-tensor figure (CPU: mmap run)."""
    out = _subprocess("memory", dict(spec, allocator="default"))
    if spec["device"] == "cpu":
        out["live_mb"] = _subprocess("memory", dict(spec, allocator="mmap"))["peak_mb"] if live else None
    return out


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


def build(name: str, mode: str, spatial_dims: int = 2, in_chans: int = 3):
    """The network a mode measures: ours with the mode's block_impl (BLOCK_IMPL), torchvision's DenseNet with the
    same architecture, CIFAR stem and weights, or MONAI's DenseNet121/169/201/264 (the same layers and
    parameters as ours), as it is or with MONAI's ActivationCheckpointWrapper around each dense layer's
    BN-ReLU-Conv-BN-ReLU-Conv (its layer output, the concatenation, is kept)."""
    if mode.startswith("monai"):
        from monai.networks import nets
        from monai.networks.blocks.activation_checkpointing import ActivationCheckpointWrapper

        model = getattr(nets, MONAI_MODELS[name])(spatial_dims=spatial_dims, in_channels=in_chans, out_channels=10)
        if mode == "monai-checkpoint":
            for module in list(model.modules()):
                if type(module).__name__ == "_DenseLayer":
                    module.layers = ActivationCheckpointWrapper(module.layers)
        return model
    from densenet.models.registry import create_model

    ours = create_model(name, num_classes=10, spatial_dims=spatial_dims, in_chans=in_chans,
                        block_impl=BLOCK_IMPL.get(mode, "plain"))
    if not mode.startswith("torchvision"):
        return ours
    from densenet.models.compat import torchvision_reference

    return torchvision_reference(ours, memory_efficient=mode == "torchvision-efficient")


def _rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _worker(kind: str, spec_json: str) -> None:
    import ctypes

    spec = json.loads(spec_json)
    if kind == "memory" and spec["device"] == "cpu" and spec["allocator"] == "mmap":
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (see the module docstring)
    import torch

    from densenet.devices import synchronize

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    modes = spec["modes"] if kind == "time" else [spec["mode"]]
    dims, in_chans = spec.get("spatial_dims", 2), spec.get("in_chans", 3)
    x = torch.randn(spec["batch"], in_chans, *[spec["size"]] * dims, device=device)
    y = torch.randint(0, 10, (spec["batch"],), device=device)
    steps = {mode: _step_fn(build(spec["model"], mode, dims, in_chans).to(device), x, y) for mode in modes}
    if kind == "memory":
        step = steps[spec["mode"]]
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            base_reserved = torch.cuda.memory_reserved(device)
        else:
            base = _rss()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        for _ in range(2):
            step()
        synchronize(device)
        seconds = (time.perf_counter() - start) / 2
        if device.type == "cuda":
            allocated = torch.cuda.max_memory_allocated(device) - base
            reserved = torch.cuda.max_memory_reserved(device) - base_reserved
            result = dict(peak_mb=reserved / 2**20, live_mb=allocated / 2**20)
        else:
            result = dict(peak_mb=(_rss("VmHWM") - base) / 2**20)
        print(json.dumps(dict(result, before_mb=base / 2**20, memory_step_seconds=seconds)))
        return
    from densenet.devices import matmul_peak

    # The CPU's fp32 matmul rate before and after the timed rounds: far below the machine's usual figure means
    # other work shared the cores, and the step times with it.
    peaks = [matmul_peak(device, "fp32")]
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(spec["repeats"] + 1):
        for mode in modes:
            synchronize(device)
            start = time.perf_counter()
            steps[mode]()
            synchronize(device)
            if round_:  # round 0 is the warm-up
                samples[mode].append(time.perf_counter() - start)
    peaks.append(matmul_peak(device, "fp32"))
    print(json.dumps(dict(seconds={mode: statistics.median(s) for mode, s in samples.items()},
                          matmul_peak_gflops=[round(p / 1e9, 1) for p in peaks])))


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
    old = [r for r in old if "step_mb" not in r]  # records of the earlier one-step, live-tensor-only method
    key = lambda r: (r["model"], r["batch"], r["size"], r["mode"], r["device"], r["threads"],  # noqa: E731
                     r.get("spatial_dims", 2), r.get("in_chans", 3))
    new_keys = {key(r) for r in records}
    merged = [r for r in old if key(r) not in new_keys] + records
    merged.sort(key=lambda r: (r.get("spatial_dims", 2) != 2, r["device"], r.get("spatial_dims", 2), r["size"],
                               r["batch"], _growth(r["model"]), _depth(r["model"]), MODES.index(r["mode"])))
    _write(path, json.dumps(merged, indent=1) + "\n")
    return merged


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def kept_notes(path: Path) -> str:
    """The hand-written part of an existing Markdown file, from its first "## Notes" heading on (kept by a rerun)."""
    text = path.read_text() if path.exists() else ""
    start = text.find("\n## Notes")
    return "\n" + text[start + 1:] if start >= 0 else ""


def _depth(name: str) -> int:
    return int(name.split("_k")[0].rsplit("bc", 1)[-1].rsplit("densenet", 1)[-1] or 0)


def _growth(name: str) -> int:
    return int(name.rsplit("_k", 1)[-1]) if "_k" in name else 0


HEADER = """# Training memory: standard vs memory-efficient DenseNet

Written by `densenet bench memory` (src/densenet/bench/memory.py); rerun it to refresh this file.

- **peak RSS (default allocator)**, what a user gets: in a fresh process per (model, mode), glibc's default
  allocator, no MALLOC_* variables: the peak RSS over two SGD training steps (zero_grad(set_to_none=True),
  forward, cross-entropy, backward, SGD-momentum update) minus the RSS after building the model and the
  batch. It includes the gradients, the momentum buffers, the first step's one-time allocations and the
  freed memory the allocator keeps. On CUDA: torch.cuda.max_memory_reserved.
- **live tensors (mmap threshold 64 KiB)**, second: the same in another fresh process where glibc mmaps every
  allocation over 64 KiB (`mallopt(M_MMAP_THRESHOLD)`), so freed tensors leave RSS at once and it follows the
  live tensors (a lower bound; steps are much slower this way). On CUDA: torch.cuda.max_memory_allocated.
- **s/step**: median of the timed rounds in one process holding all modes, stepped interleaved after a warm-up
  round (default allocator), so the speed ratio holds even on a loaded machine; the fp32 matmul peak taken
  before and after the timed rounds shows whether the machine was quiet. CPU, fp32, 10 classes, `--threads`
  torch threads; **input** is channels x side (2D: side^2, 3D: side^3 volumes, 1D: signals of that length).
- Modes: ours standard (block_impl "plain": torch.cat per layer, as torchvision), ours concat-free (one block
  buffer, each channel's BN statistics once), ours memory-efficient (shared buffer, BN-ReLU and the
  bottleneck's 1x1 convolution recomputed into per-block workspaces), torchvision's
  `DenseNet(memory_efficient=True)` (gradient checkpointing) and torchvision's standard DenseNet, both with
  the stem replaced by one 3x3 convolution: the same architecture and parameters as ours (2D only); MONAI's
  DenseNet121/169/201/264 (`monai.networks.nets`, the same layers and parameters as ours in 1D, 2D and 3D),
  as it is and with MONAI's `ActivationCheckpointWrapper` (torch.utils.checkpoint) around each dense layer.

"""

GB16_MB = 16 * 1024


def _dims(r: dict) -> int:
    return r.get("spatial_dims", 2)


def _input(r: dict) -> str:
    """Channels x side, e.g. 3x32^2 (images), 1x64^3 (volumes), 1x512 (signals)."""
    side = f"{r['size']}" if _dims(r) == 1 else f"{r['size']}^{_dims(r)}"
    return f"{r.get('in_chans', 3)}x{side}"


def _same_setting(a: dict, b: dict) -> bool:
    return (all(a[k] == b[k] for k in ("model", "batch", "size", "device", "threads"))
            and _dims(a) == _dims(b) and a.get("in_chans", 3) == b.get("in_chans", 3))


def largest_batches(records: list[dict], budget_mb: float = GB16_MB) -> list[dict]:
    """The largest batch each (model, input, mode) would train in ``budget_mb`` of process RSS, extrapolated
    from its measurements at two or more batch sizes: process RSS (the RSS after building plus the step's
    peak, default allocator) is fitted as a line in the batch size (least squares) and solved for the budget.
    An extrapolation, not a measurement: check it with one run at that batch."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("before_mb") is None:
            continue
        key = (r["model"], _input(r), r["device"], r["threads"], r["mode"])
        groups.setdefault(key, []).append(r)
    out = []
    for (model, inp, device, _, mode), rows in groups.items():
        points = sorted({(r["batch"], r["before_mb"] + r["peak_mb"]) for r in rows})
        batches = [b for b, _ in points]
        if len(set(batches)) < 2:
            continue
        mean_b = sum(batches) / len(points)
        mean_m = sum(m for _, m in points) / len(points)
        slope = (sum((b - mean_b) * (m - mean_m) for b, m in points)
                 / sum((b - mean_b) ** 2 for b in batches))
        if slope <= 0:
            continue
        fixed = mean_m - slope * mean_b
        out.append(dict(model=model, input=inp, device=device, mode=mode, per_sample_mb=slope, fixed_mb=fixed,
                        batches=sorted(set(batches)), largest_batch=int((budget_mb - fixed) // slope)))
    return out


def format_markdown(records: list[dict]) -> str:
    lines = ["| model | input | device | batch | mode | peak RSS, default allocator (CUDA: max reserved) (MB) | "
             "vs ours standard | live tensors, mmap threshold (CUDA: max allocated) (MB) | vs ours standard | "
             "s/step | speed vs ours standard |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]

    def ratio(r: dict, base: dict | None, field: str) -> str:
        return f"{r[field] / base[field]:.0%}" if base and r.get(field) and base.get(field) else "-"

    for r in records:
        base = next((b for b in records if b["mode"] == "standard" and _same_setting(b, r)), None)
        t = r.get("seconds_per_step")
        speed = f"{base['seconds_per_step'] / t:.2f}x" if base and t and base.get("seconds_per_step") else "-"
        live = f"{r['live_mb']:.0f}" if r.get("live_mb") is not None else "-"
        lines.append(f"| {r['model']} | {_input(r)} | {r['device']} | {r['batch']} | {LABELS[r['mode']]} | "
                     f"{r['peak_mb']:.0f} | {ratio(r, base, 'peak_mb')} | {live} | {ratio(r, base, 'live_mb')} | "
                     f"{f'{t:.2f}' if t else '-'} | {speed} |")
    fits = [f for f in largest_batches(records) if not f["input"].endswith("^2")]
    if fits:
        lines += ["", "Largest batch in 16 GB of process RSS, volumes and signals (extrapolated: process RSS fitted "
                  "as a line in the batch size over the batches measured, default allocator):", "",
                  "| model | input | device | mode | MB per sample | MB fixed | batches measured | largest batch |",
                  "|---|---|---|---|---:|---:|---|---:|"]
        lines += [f"| {f['model']} | {f['input']} | {f['device']} | {LABELS[f['mode']]} | {f['per_sample_mb']:.0f} | "
                  f"{f['fixed_mb']:.0f} | {', '.join(map(str, f['batches']))} | {f['largest_batch']} |" for f in fits]

    def machine(cpu: str | None, peaks: tuple | None) -> str:
        peak = f"fp32 matmul peak {' and '.join(f'{p:.0f}' for p in peaks)} GFLOP/s before and after timing"
        text = "; ".join(([cpu] if cpu else []) + ([peak] if peaks else []))
        return f" ({text})" if text else ""

    runs = sorted({(r["date"], r["command"], r.get("cpu"), tuple(r.get("matmul_peak_gflops") or ()))
                   for r in records}, key=lambda run: run[:2])
    lines += ["", "Measured by:", ""] + [f"- {date}: `{cmd}`{machine(cpu, peaks)}" for date, cmd, cpu, peaks in runs]
    return HEADER + "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    """Left: 2D peak against depth per mode; right (when measured): each mode's peak on volumes and signals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = [r for r in records if _dims(r) == 2]
    other = [r for r in records if _dims(r) != 2 and r["device"] == "cpu"]
    fig, axes = plt.subplots(1, 2 if other else 1, figsize=(12.8 if other else 6.4, 4.2), squeeze=False)
    ax = axes[0][0]
    groups = sorted({(r["batch"], _growth(r["model"])) for r in flat})
    for batch, k in groups:
        for mode in MODES:
            pts = sorted((_depth(r["model"]), r["peak_mb"]) for r in flat
                         if r["mode"] == mode and r["batch"] == batch and _growth(r["model"]) == k)
            if len(pts) >= 2:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{LABELS[mode]} (k={k}, batch {batch})")
    ax.set_xlabel("depth (DenseNet-BC)")
    ax.set_ylabel("peak RSS over two SGD steps (MB)")
    ax.set_title("Training memory, CPU, default allocator")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if other:
        ax = axes[0][1]
        settings = sorted({(r["model"], _input(r), r["batch"]) for r in other})
        modes = [m for m in MODES if any(r["mode"] == m for r in other)]
        width = 0.8 / max(len(modes), 1)
        for j, mode in enumerate(modes):
            heights = [next((r["peak_mb"] / 1024 for r in other if (r["model"], _input(r), r["batch"]) == s
                             and r["mode"] == mode), 0.0) for s in settings]
            ax.bar([i + j * width for i in range(len(settings))], heights, width, label=LABELS[mode])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(settings))])
        ax.set_xticklabels([f"{m}\n{inp}, batch {b}" for m, inp, b in settings], fontsize=8)
        ax.set_ylabel("peak RSS over two SGD steps (GB)")
        ax.set_title("Volumes: training memory, CPU, default allocator")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)

"""``densenet bench speed --model NAME``: our DenseNet against torchvision's identical network, side by side.

Three tasks, each timed for both networks interleaved in one process (A B B A A B ...), so that a
neighbour's load or the CPU's clock hits both alike:

- train: one SGD step (forward, cross-entropy, backward, update) at --batch-size (16 at 224 px, 64 at 32 px);
- infer: a no-grad forward at batch 64 (ours through --engine, torchvision always eager);
- latency: a no-grad forward of one image.

Each reports the median and spread (min, quartiles, max) of --repeats samples, images/s, the ratio
ours/torchvision, and the FLOP/s achieved (2 x MACs per forward, x3 for a training step) as a fraction of
the peak of a large matrix product timed in the same run at the same precision.

    densenet bench speed --model densenet_bc100_k12 --repeats 7 --markdown
    densenet bench speed --model densenet121 --precision bf16 --channels-last --json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from densenet.analysis.complexity import count_macs
from densenet.devices import autocast, cpu_model, matmul_peak, resolve_device, synchronize
from densenet.errors import ConfigError
from densenet.inference.engines import ENGINES, build_engine
from densenet.models.compat import torchvision_reference
from densenet.models.densenet import DenseNet, block_impl_of, set_block_impl
from densenet.models.registry import create_model, default_input_size
from densenet.training import fast


@dataclass
class Timing:
    """Seconds per call of one network on one task, over the repeats."""

    samples: list[float]
    images: int
    flops: float  # per call
    median_s: float = 0.0
    min_s: float = 0.0
    q1_s: float = 0.0
    q3_s: float = 0.0
    max_s: float = 0.0
    images_per_s: float = 0.0
    flops_per_s: float = 0.0
    peak_fraction: float = 0.0

    def summarise(self, peak_flops: float) -> Timing:
        s = sorted(self.samples)
        quartiles = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        self.median_s, self.min_s, self.max_s = statistics.median(s), s[0], s[-1]
        self.q1_s, self.q3_s = quartiles[0], quartiles[2]
        self.images_per_s = self.images / self.median_s
        self.flops_per_s = self.flops / self.median_s
        self.peak_fraction = self.flops_per_s / peak_flops
        return self


@dataclass
class TaskResult:
    task: str
    batch_size: int
    ours: Timing
    torchvision: Timing
    ratio: float = field(init=False)  # ours' throughput / torchvision's, from the median times
    # The same ratio within each round (the two calls ran back to back), whose median shrugs off a load that
    # changes between rounds: median, min, max.
    paired_ratio: tuple[float, float, float] = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.torchvision.median_s / self.ours.median_s
        rounds = [t / o for o, t in zip(self.ours.samples, self.torchvision.samples, strict=True)]
        self.paired_ratio = (statistics.median(rounds), min(rounds), max(rounds))


def _interleaved(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                 inner: int = 1) -> dict[str, list[float]]:
    """Time each call ``repeats`` times, alternating the order every round (ABBA...) after ``warmup`` rounds."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                calls[name]()
            synchronize(device)
            if round_ >= warmup:
                samples[name].append((time.perf_counter() - start) / inner)
    return samples


def _forward(model: Callable, x: torch.Tensor, device: torch.device, precision: str) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad(), autocast(device, precision):
            return model(x)
    return call


def _prepare(model: nn.Module, device: torch.device, channels_last: bool, compile_: bool) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile_ else model


def _input(batch: int, model: DenseNet, size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.randn(batch, model.in_chans, size, size, device=device)
    return x.to(memory_format=torch.channels_last) if channels_last else x


_CATEGORIES = (("conv", ("conv", "mkldnn")), ("batch norm", ("batch_norm", "var_mean")),
               ("concatenation/copy", ("cat", "copy_", "split", "narrow")), ("relu", ("relu", "threshold")),
               ("optimizer", ("_foreach", "add_", "mul_", "addcmul", "lerp")))


def profile_step(step: Callable[[], None], steps: int = 2) -> dict[str, float]:
    """Seconds per call by kind of operator (torch.profiler's self CPU time): where a training step goes."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = {name: 0.0 for name, _ in _CATEGORIES} | {"other": 0.0}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for k, words in _CATEGORIES if any(w in name for w in words)), "other")
        totals[kind] += event.self_cpu_time_total / 1e6 / steps
    return totals


# The "paths" task: training settings timed side by side, ours first. "ours default" is what ``densenet train``
# runs for a long run (training/fast.py decides it, on a CPU by timing its candidates); the others are fixed.
PATHS = ("ours default", "ours eager NCHW", "ours eager channels_last", "torchvision eager NCHW",
         "torchvision eager channels_last", "torchvision compiled channels_last")


def run_paths(args: argparse.Namespace, ours: DenseNet, reference: nn.Module, size: int, macs: float,
              device: torch.device, batch: int, peak: float) -> dict:
    """One training step of each of PATHS, interleaved in one process; images/s and the two ratios."""
    from densenet.training.options import TrainOptions

    runtime = fast.plan(TrainOptions(dataset="cifar10", amp="bf16" if args.precision == "bf16" else "none"),
                        device, total_steps=10**6)  # a long run: what densenet train chooses for it
    if runtime.timed:  # on a CPU densenet train times its candidate paths and keeps the fastest: so does this
        runtime = fast.time_paths(copy.deepcopy(ours).to(device), runtime, (ours.in_chans, size, size),
                                  max(ours.num_classes, 1), batch)
    y = torch.randint(0, max(ours.num_classes, 1), (batch,), device=device)
    calls, settings = {}, {}
    for name in PATHS:
        source = ours if name.startswith("ours") else reference
        net = copy.deepcopy(source).to(device).train()
        if name == "ours default":
            channels_last, compiled = runtime.channels_last, runtime.compile
        else:
            channels_last, compiled = "channels_last" in name, "compiled" in name
        if source is ours:  # the dense blocks densenet train runs on this path (fast.block_impl_for)
            set_block_impl(net, runtime.block_impl if name == "ours default" else fast.block_impl_for(
                compiled, channels_last, runtime.amp, args.memory_efficient))
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        forward = fast.StaticBatchModule(net, {batch}) if compiled else net
        x = _input(batch, ours, size, device, channels_last)
        calls[name] = fast.sgd_step(net, x, y, device, args.precision, forward=forward)
        settings[name] = dict(channels_last=channels_last, compiled=compiled,
                              block_impl=block_impl_of(net) if source is ours else None)
    start = time.perf_counter()
    for call in calls.values():  # compile (or warm up) each before timing
        call()
    setup_s = time.perf_counter() - start
    samples = _interleaved(calls, device, args.warmup, args.repeats)
    flops = 3 * 2 * macs * batch
    timings = {name: Timing(samples[name], batch, flops).summarise(peak) for name in calls}
    best_eager = max((n for n in PATHS if n.startswith("torchvision eager")), key=lambda n: timings[n].images_per_s)
    default = timings["ours default"]
    return dict(batch_size=batch, settings=settings, setup_s=setup_s, best_torchvision_eager=best_eager,
                timings={n: asdict(t) for n, t in timings.items()},
                default_vs_best_torchvision_eager=default.images_per_s / timings[best_eager].images_per_s,
                default_vs_ours_eager_nchw=default.images_per_s / timings["ours eager NCHW"].images_per_s)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Measure every task in ``args.tasks``; returns a JSON-ready dict (see ``format_markdown``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.engine != "eager" and args.precision != "fp32":
        raise ConfigError(f"--engine {args.engine} runs in fp32 only; use --precision fp32 or --engine eager")
    torch.manual_seed(0)
    ours = create_model(args.model, memory_efficient=args.memory_efficient)
    reference = torchvision_reference(ours)
    size = args.input_size or default_input_size(ours.stem)
    macs = count_macs(ours, size)
    peak = matmul_peak(device, args.precision, args.matmul_size)
    train_batch = args.batch_size or (16 if size >= 128 else 64)
    results: list[TaskResult] = []
    profiles: dict[str, dict[str, float]] = {}
    paths = None
    if "paths" in args.tasks:
        paths = run_paths(args, ours, reference, size, macs, device, train_batch, peak)
    for task in [t for t in args.tasks if t != "paths"]:
        batch = {"train": train_batch, "infer": args.infer_batch_size, "latency": 1}[task]
        x = _input(batch, ours, size, device, args.channels_last)
        if task == "train":
            y = torch.randint(0, max(ours.num_classes, 1), (batch,), device=device)
            calls = {}
            amp = "bf16" if args.precision == "bf16" else "none"
            for name, net in (("ours", copy.deepcopy(ours)), ("torchvision", reference)):
                net = _prepare(net, device, args.channels_last, args.compile).train()
                if name == "ours":  # the dense blocks densenet train would run with these settings
                    set_block_impl(net, fast.block_impl_for(args.compile, args.channels_last, amp,
                                                            args.memory_efficient))
                calls[name] = fast.sgd_step(net, x, y, device, args.precision)
            flops = 3 * 2 * macs * batch
        else:
            engine = build_engine(ours, args.engine, example=x, device=device, channels_last=args.channels_last)
            ref = _prepare(reference, device, args.channels_last, args.compile).eval()
            calls = {"ours": _forward(engine, x, device, args.precision),
                     "torchvision": _forward(ref, x, device, args.precision)}
            flops = 2 * macs * batch
        if task == "train" and args.profile:
            profiles = {name: profile_step(call) for name, call in calls.items()}
        inner = 10 if task == "latency" else 1
        samples = _interleaved(calls, device, args.warmup, args.repeats, inner)
        timings = {name: Timing(samples[name], batch, flops).summarise(peak) for name in calls}
        results.append(TaskResult(task, batch, timings["ours"], timings["torchvision"]))
    return dict(
        model=args.model, input_size=size, macs_per_image=macs,
        settings=dict(device=str(device), precision=args.precision, channels_last=args.channels_last,
                      compile=args.compile, memory_efficient=args.memory_efficient, engine=args.engine,
                      threads=torch.get_num_threads(), warmup=args.warmup, repeats=args.repeats),
        machine=dict(processor=cpu_model(), torch=torch.__version__,
                     gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None),
        matmul_peak_flops=peak, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        results=[asdict(r) for r in results], train_profile=profiles, paths=paths,
    )


def format_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"**{report['model']}** at {report['input_size']} px, {s['precision']}, "
             f"{'channels_last' if s['channels_last'] else 'NCHW'}{', compiled' if s['compile'] else ''}"
             f"{', memory-efficient' if s['memory_efficient'] else ''}, engine {s['engine']}, "
             f"{s['threads']} threads, {s['device']}; matmul peak {report['matmul_peak_flops'] / 1e9:.0f} GFLOP/s; "
             f"median of {s['repeats']} (min-max)",
             "",
             "| task | batch | ours img/s | torchvision img/s | ours/torchvision | per round (min-max) | ours % peak "
             "| torchvision % peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if report.get("paths"):
        lines += _format_paths(report["paths"])
    for r in report["results"]:
        o, t = r["ours"], r["torchvision"]

        def cell(x: dict) -> str:
            return f"{x['images_per_s']:.1f} ({x['images'] / x['max_s']:.1f}-{x['images'] / x['min_s']:.1f})"
        paired = "{:.2f}x ({:.2f}-{:.2f})".format(*r["paired_ratio"])
        lines.append(f"| {r['task']} | {r['batch_size']} | {cell(o)} | {cell(t)} | {r['ratio']:.2f}x | {paired} | "
                     f"{100 * o['peak_fraction']:.0f}% | {100 * t['peak_fraction']:.0f}% |")
    if report.get("train_profile"):
        p = report["train_profile"]
        lines += ["", "| training step, seconds by operator kind | ours | torchvision |", "|---|---:|---:|"]
        for kind in p["ours"]:
            lines.append(f"| {kind} | {p['ours'][kind]:.3f} | {p['torchvision'][kind]:.3f} |")
    return "\n".join(lines)


def _format_paths(p: dict) -> list[str]:
    lines = ["", f"Training step, batch {p['batch_size']}: `densenet train`'s default path for a long run against "
             f"fixed settings (interleaved; compiling and warm-up took {p['setup_s']:.0f} s before timing)", "",
             "| training path | img/s (min-max) | vs ours eager NCHW | % peak |", "|---|---:|---:|---:|"]
    base = p["timings"]["ours eager NCHW"]["images_per_s"]
    for name, t in p["timings"].items():
        setting = p["settings"][name]
        label = name if name != "ours default" else ("**ours default** (" + ("compiled" if setting["compiled"]
                                                     else "eager") + (", channels_last" if setting["channels_last"]
                                                                      else ", NCHW") + ")")
        lines.append(f"| {label} | {t['images_per_s']:.1f} ({t['images'] / t['max_s']:.1f}-"
                     f"{t['images'] / t['min_s']:.1f}) | {t['images_per_s'] / base:.2f}x | "
                     f"{100 * t['peak_fraction']:.0f}% |")
    lines += ["", f"Ours default / best torchvision eager ({p['best_torchvision_eager']}): "
              f"**{p['default_vs_best_torchvision_eager']:.2f}x**; ours default / ours eager NCHW: "
              f"**{p['default_vs_ours_eager_nchw']:.2f}x**", ""]
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a DenseNet-BC or ImageNet name, e.g. densenet_bc100_k12")
    parser.add_argument("--tasks", nargs="+", choices=("train", "infer", "latency", "paths"),
                        default=["train", "infer", "latency"],
                        help="paths: densenet train's default training path against torchvision's eager NCHW, eager "
                        "channels_last and compiled settings (compiles two networks: minutes on a CPU)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    parser.add_argument("--channels-last", action="store_true", help="both networks and inputs channels_last")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--memory-efficient", action="store_true", help="our memory-efficient dense blocks")
    parser.add_argument("--engine", choices=ENGINES, default="eager",
                        help="our inference path for infer/latency (torchvision stays eager)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default 16 at 224 px, 64 at 32)")
    parser.add_argument("--infer-batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="also break a training step down by operator kind")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square product timed for the peak")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the full report as JSON")
    output.add_argument("--markdown", action="store_true", help="print a markdown table")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    if (args.batch_size is not None and args.batch_size < 1) or args.infer_batch_size < 1:
        raise ConfigError("--batch-size and --infer-batch-size must be >= 1")
    with fast.inductor_cache():  # the compiled paths reuse densenet train's kernels
        report = run_benchmark(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_markdown(report))
    return 0

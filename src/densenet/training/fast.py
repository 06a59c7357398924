"""The fastest correct training path for this run, chosen without flags: compile, memory layout, threads.

``densenet train`` calls ``plan(...)`` once it knows the model, the device and the number of steps:

- **torch.compile** (inductor) when the run has enough steps to pay for compiling (a minute or two on a
  2-core CPU; see ``COMPILE_MIN_STEPS``), on CPU and CUDA, single process or DDP. Not for the
  memory-efficient mode, whose hand-written autograd Function inductor cannot fuse (it runs eager, said in
  one line). Inductor's on-disk caches (FX graph and AOTAutograd) live in ``~/.cache/densenet/inductor``
  unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise, so a second run of the same network compiles from cache.
  The compiled graph has a fixed batch size: a smaller last batch runs the same module eagerly instead of
  compiling a second graph. If compiling fails (no C++ compiler, an unsupported op), the run goes on
  eagerly and says so.
- **channels_last** with compile (inductor's convolutions prefer NHWC on CPU and CUDA) and on CUDA. An
  eager CPU run that is not timed (below: shorter than COMPILE_MIN_STEPS, or ``--compile off``) stays NCHW,
  where the dense blocks run concatenation-free (``block_impl``, below) and keep the least memory: on the
  2-core AMD EPYC, fp32, the plain concatenation in channels_last trained 1.15-1.33x faster (the ``paths``
  tables in docs/benchmarks.md), but the plain concatenation's peak RSS over two steps was 1.50x ours
  (DenseNet-BC-100 k=12, batch 64: 2487 against 1662 MB) and 1.38x (DenseNet-121, 224 px, batch 16: 2308
  against 1670 MB; ``densenet bench memory --models M --modes standard torchvision --batch-size B --repeats 0
  --no-live``, 2026-11-30 15:38 UTC). ``--channels-last`` picks speed.
- **measured, not assumed, on a CPU**: which of compiled channels_last, eager channels_last and eager NCHW
  is fastest depends on the CPU and the precision (a 2-core AMD EPYC with AVX-512 BF16: compiled 1.7x eager
  in bf16, but eager channels_last 1.1x compiled in fp32; an Intel Xeon without bf16: compiled 1.35-1.45x
  eager in fp32). So a long single-process CPU run with ``--compile auto`` and no layout flag trains a copy
  of the model for a few steps in each path (``time_paths``) and keeps the fastest; the compiled candidate
  fills inductor's cache, so the run's own compile is a cache hit. The timings go into config.yaml.
- **the dense block's implementation** (``block_impl``, models/densenet.py), from the path (``block_impl_for``):
  "efficient" with ``--memory-efficient``; "concat_free" for eager fp32 NCHW training, where it keeps the least
  memory (``densenet bench memory --models densenet_bc100_k12 --modes standard torchvision --batch-size 16
  --repeats 0``, 2026-12-06, when the standard mode ran it there: peak RSS over two SGD steps 448 MB against
  torchvision's plain concatenation's 692 MB; 1662 against 2487 MB at batch 64, above); "plain" (torch.cat)
  everywhere else: compiled (inductor optimises the concatenation itself and runs the buffer blocks only
  eagerly), channels_last (the buffer's channel slices are strided there: 0.75x its NCHW speed, eager,
  DenseNet-BC-40 k=12, batch 64, 2-core CPU) and autocast (0.53-0.54x torchvision's eager bf16 step: `densenet
  bench speed --model densenet_bc100_k12 --tasks train --precision bf16`, 2026-11-30). All three give the same
  results (tests/models/test_block_impl.py); ``densenet train`` sets the model to it, config.yaml records it.
- **threads**: torch's default (one per core), except for the 8x8 digits (see options.py).
- **precision** stays what ``--amp`` says (fp32 by default: the paper's numbers). ``--amp auto`` picks bf16
  autocast where the hardware computes bf16 natively (a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX;
  measured on a 2-core AMD EPYC with AVX-512 BF16: about 2x the fp32 speed of DenseNet-BC-40 k=12, compiled),
  and fp32 elsewhere, where bf16 is emulated and slower.

``--compile off`` (or ``on``), ``--channels-last``/``--no-channels-last`` and ``--threads`` override each
choice, ``--eager`` turns off both compile and channels_last; config.yaml records what ran (``runtime``,
including ``block_impl``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from densenet.devices import native_bf16

# A run shorter than this many optimiser steps stays eager: compiling a DenseNet's training step costs about
# 30-100 s on a 2-core CPU, the time of a few hundred eager steps of a CIFAR model.
COMPILE_MIN_STEPS = 2000


@dataclass
class Runtime:
    """What the training path is, as recorded in config.yaml under ``runtime``."""

    compile: bool
    channels_last: bool
    threads: int
    device: str
    amp: str
    reason: str
    block_impl: str | None = "plain"  # how the dense blocks compute (block_impl_for); None: a model without any
    timed: bool = False  # compile and channels_last are to be chosen by time_paths (set by plan)
    rates: dict[str, float] | None = None  # images/s of each path time_paths tried

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"torch": str(torch.__version__)}


def plan(options, device: torch.device, total_steps: int, distributed: bool = False, spatial_dims: int = 2
         ) -> Runtime:
    """Decide compile / channels_last for this run from the options (None or "auto": decide here).

    channels_last is for 2D images only: 1D signals have no such layout, and the CPU's 3D convolutions do not
    keep channels_last_3d (their outputs come back contiguous), so volumes train in the plain layout."""
    from densenet.errors import ConfigError

    if options.channels_last and spatial_dims != 2:
        raise ConfigError(f"--channels-last is for 2D images; these data are {spatial_dims}D")
    if options.compile == "off":
        compile_, reason = False, "--compile off"
    elif options.memory_efficient:  # even with --compile on
        compile_, reason = False, "memory-efficient blocks run eagerly (inductor cannot fuse their autograd Function)"
    elif options.compile == "on":
        compile_, reason = True, "--compile on"
    elif total_steps < COMPILE_MIN_STEPS:
        compile_, reason = False, f"{total_steps} steps: too short to pay for compiling (< {COMPILE_MIN_STEPS})"
    else:
        compile_, reason = True, f"{total_steps} steps: compiled"
    timed = (options.compile == "auto" and compile_ and options.channels_last is None and device.type == "cpu"
             and not distributed)
    channels_last = options.channels_last
    if channels_last is None:
        channels_last = (compile_ or device.type == "cuda") and spatial_dims == 2
    timed = timed and spatial_dims == 2  # the paths timed differ in layout only where there is a choice
    amp = options.amp
    if amp == "auto":
        amp = "bf16" if native_bf16(device) else "none"
    block_impl = block_impl_for(compile_, bool(channels_last), amp, options.memory_efficient)
    return Runtime(compile=compile_, channels_last=bool(channels_last), threads=torch.get_num_threads(),
                   device=str(device), amp=amp, reason=reason, block_impl=block_impl, timed=timed)


def block_impl_for(compile_: bool, channels_last: bool, amp: str, memory_efficient: bool) -> str:
    """The dense block implementation for a training path: "efficient" when asked for, "concat_free" for eager
    fp32 NCHW (the least memory there), "plain" where the buffer is slower or not compiled (module docstring)."""
    if memory_efficient:
        return "efficient"
    if compile_ or channels_last or amp != "none":
        return "plain"
    return "concat_free"


def sgd_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, amp: str,
             forward: Callable | None = None) -> Callable[[], None]:
    """One Nesterov-SGD training step on a fixed batch, as a call: what time_paths and ``densenet bench speed``
    time (``forward``, default ``model``, computes the logits, e.g. a compiled module)."""
    from densenet.devices import autocast

    forward = model if forward is None else forward  # not `or`: a compiled module has no truth value
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4, nesterov=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        loss.backward()
        optimizer.step()
    return step


# (name, compile, channels_last): the paths time_paths compares, the usual winner first.
PATHS = (("compiled channels_last", True, True), ("eager channels_last", False, True), ("eager NCHW", False, False))


def time_paths(model: torch.nn.Module, runtime: Runtime, input_shape: tuple[int, ...], num_classes: int,
               batch_size: int, steps: int = 6, say: Callable[[str], None] = print) -> Runtime:
    """Train a copy of ``model`` for a few SGD steps on a random batch in each of PATHS (each with its
    ``block_impl_for``); keep the fastest.

    The model, its optimiser and the random number generators are left as they were (a copy trains, the RNG
    state is restored), so a timed run gives the same numbers as one told its path. Costs about one compile
    (cached on disk and reused by the run) plus 3 x (2 + ``steps``) training steps.
    """
    from densenet.models.densenet import set_block_impl

    device = torch.device(runtime.device)
    efficient = runtime.block_impl == "efficient"
    rng = torch.get_rng_state()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *input_shape), generator=generator).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    rates: dict[str, float] = {}
    try:
        for name, compile_, channels_last in PATHS:
            net = copy.deepcopy(model).train()
            set_block_impl(net, block_impl_for(compile_, channels_last, runtime.amp, efficient))
            layout = torch.channels_last if channels_last else torch.contiguous_format
            net = net.to(memory_format=layout)
            inputs = x.contiguous(memory_format=layout)
            forward = StaticBatchModule(net, {batch_size}, say=say) if compile_ else net
            step = sgd_step(net, inputs, y, device, runtime.amp, forward=forward)
            step(), step()  # warm-up: compiling, allocator, caches
            if compile_ and forward.compiled is None:  # the compiler failed (said once): not a candidate
                continue
            start = time.perf_counter()
            for _ in range(steps):
                step()
            rates[name] = round(steps * batch_size / (time.perf_counter() - start), 1)
    finally:
        torch.set_rng_state(rng)
    if not rates:
        return replace(runtime, timed=False)
    best = max(rates, key=rates.get)
    _, compile_, channels_last = next(p for p in PATHS if p[0] == best)
    table = ", ".join(f"{name} {rate:g}" for name, rate in rates.items())
    return replace(runtime, compile=compile_, channels_last=channels_last, timed=False, rates=rates,
                   block_impl=block_impl_for(compile_, channels_last, runtime.amp, efficient),
                   reason=f"{runtime.reason}, timed fastest ({table} img/s)")


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled kernels and graphs between runs: the user's TORCHINDUCTOR_CACHE_DIR, else
    ~/.cache/densenet/inductor (or under XDG_CACHE_HOME).

    Importing torchvision already sets ``TORCHINDUCTOR_CACHE_DIR`` to inductor's default (a folder under /tmp,
    gone at reboot), so that value counts as unset; any other value is the user's and is kept.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path or os.path.abspath(path) == os.path.abspath(default_cache_dir()):
        path = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "densenet" / "inductor")
    return Path(path)


@contextlib.contextmanager
def inductor_cache() -> Iterator[Path]:
    """Inductor's cache folder set to ``inductor_cache_dir()`` for a run, and the caller's setting restored after.

    Inductor reads the folder from the TORCHINDUCTOR_CACHE_DIR variable only (its compile workers inherit it), so
    the variable is what is set; it is set where a run starts (``densenet train``, the speed benchmark), never by a
    constructor, and put back as it was when the run ends.
    """
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    path = inductor_cache_dir()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


class StaticBatchModule:
    """Calls the compiled module for batches of the compiled size and the plain module otherwise.

    One compiled graph per mode (train, eval) and batch size: the last, smaller batch of an epoch runs
    eagerly instead of triggering a recompilation (tens of seconds on a CPU). The first compiled call that
    fails (no C++ compiler, an op inductor does not know) turns compiling off for the rest of the run, with
    one line saying why; the step is then run eagerly.
    """

    def __init__(self, module: torch.nn.Module, batch_sizes: set[int], say=print) -> None:
        self.module = module
        self.batch_sizes = set(batch_sizes)
        self.say = say
        self.compiled: Any = torch.compile(module, dynamic=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None or x.shape[0] not in self.batch_sizes:
            return self.module(x)
        try:
            return self.compiled(x)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, the run goes on
            self.compiled = None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.say(f"torch.compile failed ({type(exc).__name__}: {first[:200]}); training on eagerly")
            return self.module(x)

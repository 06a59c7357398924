"""Ways to run a trained DenseNet forward, each an ``Engine``: ``images (N,C,H,W) float -> logits``.

- ``eager``: the model as it is, in eval mode (always there);
- ``folded``: eager with the foldable BNs merged into convolutions (see ``densenet.inference.fold``);
- ``compile``: the folded model through ``torch.compile`` (inductor, weights frozen and prepacked), for one
  batch size (smaller batches are padded, larger ones split);
- ``onnxruntime``, ``openvino``: the folded model exported to ONNX (``densenet.inference.onnx_export``) and run
  by ONNX Runtime or OpenVINO in fp32 (optional packages: ``pip install 'densenet-paper[onnx]'`` or
  ``'densenet-paper[openvino]'``);
- ``openvino-bf16``: OpenVINO computing in bfloat16 (native on CPUs with AVX-512 BF16 or AMX, emulated and
  slow elsewhere): reduced precision, like int8;
- ``onnxruntime-int8``, ``openvino-int8``: that graph quantised to int8, calibrated on the images you give
  (``calibration``; random images if none: fine for speed, not for accuracy);
- ``auto``: the fastest engine that keeps eager's accuracy on this hardware (``auto_order``, measured in
  docs/benchmarks.md): ``openvino-bf16`` on a CPU that computes bf16 natively (AVX-512 BF16 or AMX), else the
  fp32 engines ``AUTO_ORDER``. Each candidate is checked against eager on up to ``CHECK_IMAGES`` images of the
  example (give real ones): fp32 within ``AUTO_TOLERANCE``, bf16 within ``BF16_TOLERANCE`` with the top class
  of ``BF16_AGREEMENT`` of the images kept. ``Engine.note`` says why another one ran when the first could not.

    engine = build_engine(model, "auto", example=images[:64])
    logits = engine(images)
    print(engine.name, engine.build_seconds, engine.from_cache)

Built files (ONNX graphs, int8 models, OpenVINO's compiled blobs) are kept under ``engine_cache_dir()``, one
folder per engine, weights, input shape, calibration and runtime version, so that the next process loads them
instead of building; inductor keeps its compiled kernels in its own on-disk cache. Only the ``CACHE_ENTRIES``
most recently used folders are kept (a DenseNet-121 folder holds 27 MB for ONNX Runtime, 54 MB for OpenVINO).
``cache=False`` builds in a temporary folder that is gone when ``build_engine`` returns.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import Tensor, nn

from densenet.devices import native_bf16
from densenet.errors import ConfigError
from densenet.inference.fold import fold_batchnorm
from densenet.models.densenet import set_block_impl

ENGINES = ("eager", "folded", "compile", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16",
           "openvino-int8")
CHOICES = ("auto", *ENGINES)
# What ``auto`` tries on a CPU, fastest first (docs/benchmarks.md, "Inference engines"); eager is always there.
AUTO_ORDER = ("openvino", "onnxruntime", "eager")
# Tried first where the CPU has native bf16: 4.1x / 6.1x torchvision eager at the same top-1 (same section).
AUTO_BF16 = "openvino-bf16"
# The images of the example an auto candidate is checked on, against eager (each costs an eager forward).
CHECK_IMAGES = 16
# An fp32 candidate whose logits stray further than this (times the largest eager logit, at least 1) is not used.
AUTO_TOLERANCE = 1e-3
# bf16 keeps 8 bits of mantissa. OpenVINO bf16 logits strayed from eager's by 5.3e-2 on 256 CIFAR-10 test
# images whose largest logit is 7.0 (0.8%; 7.4e-2 over all 10,000) through the CPU recipe's DenseNet-BC-40, and
# by 3.3e-2 on 16 images through DenseNet-121 with random weights, logits up to 1.4 (2.3%). A candidate
# straying more than BF16_TOLERANCE times that scale, or changing the top class of more than 1 - BF16_AGREEMENT
# of the images, is not used: that would be a broken build, not bf16 rounding.
BF16_TOLERANCE = 5e-2
BF16_AGREEMENT = 0.9
# Built engines kept in the cache folder, the most recently used first.
CACHE_ENTRIES = 8
_PACKAGE = {"onnxruntime": "onnxruntime", "onnxruntime-int8": "onnxruntime", "openvino": "openvino",
            "openvino-bf16": "openvino", "openvino-int8": "openvino"}
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}


@dataclass
class Engine:
    """A built engine: call it on a float batch for the logits (no autograd)."""

    name: str
    run: Callable[[Tensor], Tensor]
    build_seconds: float  # export, quantisation, compilation: everything before the first batch could run
    from_cache: bool = False  # built from files an earlier process left in the cache
    note: str = ""  # why this engine runs rather than the one asked for (``auto``)

    def __call__(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.run(images)

    def describe(self) -> str:
        cached = ", from the cache" if self.from_cache else ""
        return f"engine {self.name} (built in {self.build_seconds:.1f} s{cached})"


def engine_cache_dir() -> Path:
    """Where built engines are kept: $DENSENET_ENGINE_CACHE, else ~/.cache/densenet/engines."""
    path = os.environ.get("DENSENET_ENGINE_CACHE")
    if path:
        return Path(path)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "densenet" / "engines"


def build_engine(model: nn.Module, engine: str, example: Tensor, device: torch.device | str = "cpu",
                 channels_last: bool = False, calibration: Tensor | None = None, threads: int | None = None,
                 cache: bool = True, sigmoid: bool = False) -> Engine:
    """``model`` (eval mode) running through ``engine`` (one of ``CHOICES``); see the module docstring.

    ``example`` is a batch of the size and shape to expect: ``compile`` is built for its batch size.
    ``sigmoid``: the outputs are independent probabilities (binary, multilabel tasks), so ``auto`` checks an
    engine's agreement on each label's decision at 0.5 rather than on the top class (``disagreement``).
    """
    device = torch.device(device)
    if engine == "auto":
        return _auto(model, example, device, channels_last, threads, cache, sigmoid)
    if engine not in ENGINES:
        raise ConfigError(f"unknown inference engine {engine!r}; choose one of {', '.join(CHOICES)}")
    threads = threads or torch.get_num_threads()
    start = time.perf_counter()
    if engine in ("eager", "folded", "compile"):
        net = model.to(device).eval() if engine == "eager" else fold_batchnorm(model).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if engine != "compile":
            return Engine(engine, net, time.perf_counter() - start)
        run = _compiled(net, example.to(device))
        return Engine(engine, run, time.perf_counter() - start)
    if device.type != "cpu":
        raise ConfigError(f"--engine {engine} runs on the CPU only; use --device cpu or --engine eager/compile")
    _require(engine)
    net = fold_batchnorm(model).cpu()  # a copy
    set_block_impl(net, "plain")  # the standard graph: same results, nothing custom to export
    run, from_cache = _onnx_engine(net, engine, example.cpu(), calibration, threads, cache)
    with torch.no_grad():
        run(example.cpu())  # OpenVINO compiles for the batch size on first use: part of the build
    return Engine(engine, run, time.perf_counter() - start, from_cache)


def missing_package(engine: str) -> str | None:
    """The package ``engine`` needs that is not installed, with the command that installs it; None if none."""
    from importlib.util import find_spec

    packages = [_PACKAGE[engine]] + (["nncf"] if engine == "openvino-int8" else []) if engine in _PACKAGE else []
    for package in packages:
        try:
            found = find_spec(package) is not None
        except ValueError:  # a module set to None in sys.modules (how tests hide a package)
            found = False
        if not found:
            return f"{package} (pip install 'densenet-paper[{_EXTRA[engine.split('-')[0]]}]')"
    return None


def _require(engine: str) -> None:
    missing = missing_package(engine)
    if missing:
        raise ConfigError(f"--engine {engine} needs {missing}")


def auto_order(device: torch.device) -> tuple[str, ...]:
    """The engines ``auto`` tries on ``device``, fastest first; eager, always there, last."""
    if device.type != "cpu":
        return ("eager",)
    return (AUTO_BF16, *AUTO_ORDER) if native_bf16(device) else AUTO_ORDER


def disagreement(name: str, logits: Tensor, expected: Tensor, sigmoid: bool = False) -> str | None:
    """Why engine ``name``'s ``logits`` are not eager's ``expected`` within its precision; None if they are.

    ``sigmoid`` (binary, multilabel): the decisions compared are each output's probability above 0.5 (logit
    above 0), not the argmax, which a one-logit binary model would always keep."""
    for who, values in (("eager", expected), (name, logits)):
        if not bool(torch.isfinite(values).all()):  # NaN compares as within any tolerance: check it first
            return f"{name} not used: {who} gave non-finite logits"
    worst = float((logits.float() - expected.float()).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if name == AUTO_BF16:
        kept = (float(((logits > 0) == (expected > 0)).float().mean()) if sigmoid or expected.shape[1] == 1
                else float((logits.argmax(1) == expected.argmax(1)).float().mean()))
        if worst > BF16_TOLERANCE * scale:
            return f"{name} strayed {worst:.1e} from eager (bf16 allows {BF16_TOLERANCE * scale:.1e})"
        if kept < BF16_AGREEMENT:
            what = "decisions at 0.5" if sigmoid or expected.shape[1] == 1 else "top class"
            return f"{name} kept eager's {what} on {100 * kept:.0f}% of {len(expected)} images"
        return None
    if worst > AUTO_TOLERANCE * scale:
        return f"{name} strayed {worst:.1e} from eager"
    return None


def _auto(model: nn.Module, example: Tensor, device: torch.device, channels_last: bool, threads: int | None,
          cache: bool, sigmoid: bool = False) -> Engine:
    """The first engine of ``auto_order`` that is installed, builds and agrees with eager on the example."""
    skipped: list[str] = []
    probe = example[:CHECK_IMAGES].to(device)
    with torch.no_grad():
        expected = model.to(device).eval()(probe).float().cpu()
    for name in auto_order(device):
        if name == "eager":
            break
        missing = missing_package(name)
        if missing:
            skipped.append(f"{name} is not installed: {missing}")
            continue
        try:
            engine = build_engine(model, name, example, device, channels_last, threads=threads, cache=cache)
            problem = disagreement(name, engine(probe).float().cpu(), expected, sigmoid)
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot build this graph: the next one will do
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            skipped.append(f"{name} failed ({first})")
            continue
        if problem is None:
            engine.note = f"{'; '.join(skipped)}; ran {name}" if skipped else ""
            return engine
        skipped.append(problem)
    engine = build_engine(model, "eager", example, device, channels_last, threads=threads, cache=cache)
    engine.note = f"{'; '.join(skipped)}; ran eager" if skipped else ""
    return engine


def _compiled(net: nn.Module, example: Tensor) -> Callable[[Tensor], Tensor]:
    """``net`` compiled by inductor for ``example``'s batch size, compiled now (the build time is compile time)."""
    # freezing turns the weights into constants that inductor folds and prepacks for oneDNN; given as this
    # compilation's option, it changes nothing for other compilations in the process.
    compiled = torch.compile(net, dynamic=False, options={"freezing": True})
    size = example.shape[0]
    with torch.no_grad():
        compiled(example)

    def run(images: Tensor) -> Tensor:
        if images.shape[0] == size:
            return compiled(images)
        parts = []
        for chunk in images.split(size):  # one graph: pad the short batch rather than compile a second one
            n = chunk.shape[0]
            if n < size:
                chunk = torch.cat([chunk, chunk.new_zeros(size - n, *chunk.shape[1:])])
            parts.append(compiled(chunk)[:n])
        return torch.cat(parts)
    return run


def _onnx_engine(net: nn.Module, engine: str, example: Tensor, calibration: Tensor | None, threads: int,
                 cache: bool) -> tuple[Callable[[Tensor], Tensor], bool]:
    """The runner of an ONNX-based engine, built in (or loaded from) its cache folder; (runner, from cache)."""
    from densenet.inference import runtimes
    from densenet.inference.onnx_export import onnx_bytes

    int8 = engine.endswith("-int8")
    if int8 and calibration is None:
        calibration = torch.randn(64, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    target = {"onnxruntime": "model.onnx", "openvino": "model.onnx", "openvino-bf16": "model.onnx",
              "onnxruntime-int8": "model.int8.onnx", "openvino-int8": "model.int8.xml"}[engine]
    folder = engine_cache_dir() / f"{engine}-{_cache_key(net, engine, example, calibration if int8 else None)}"
    from_cache = cache and (folder / target).is_file()
    if from_cache:
        _touch(folder)  # used now: the last to be evicted
    work = None
    if not from_cache:
        root = folder.parent if cache else None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{engine}-", dir=root))
        try:
            (work / "model.onnx").write_bytes(onnx_bytes(net, example[:1]))
            if engine == "onnxruntime-int8":
                runtimes.quantize_onnxruntime(work / "model.onnx", work / target, calibration)
            elif engine == "openvino-int8":
                runtimes.quantize_openvino(work / "model.onnx", work / target, calibration)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        if cache:
            try:
                work.rename(folder)  # complete or absent: a folder is only ever seen whole
            except OSError:  # another process put it there first
                shutil.rmtree(work, ignore_errors=True)
            work = None
            _evict(folder.parent, keep=CACHE_ENTRIES)
    where = folder if work is None else work
    try:
        if engine.startswith("onnxruntime"):
            return runtimes.onnxruntime_runner(where / target, threads), from_cache
        blobs = where / "compiled" if cache else None  # OpenVINO's compiled model, for the next process
        precision = "bf16" if engine == "openvino-bf16" else "f32"
        return runtimes.openvino_runner(where / target, threads, blobs, precision), from_cache
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)  # the runtimes hold the model in memory


def _cache_key(net: nn.Module, engine: str, example: Tensor, calibration: Tensor | None) -> str:
    """16 hex digits naming everything the built files depend on."""
    digest = hashlib.sha256()
    package = _PACKAGE[engine]
    try:
        runtime = version(package)
    except PackageNotFoundError:
        runtime = "?"
    digest.update(f"{engine} {tuple(example.shape[1:])} torch {torch.__version__} {package} {runtime}".encode())
    tensors = list(net.state_dict().items()) + ([("calibration", calibration)] if calibration is not None else [])
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _touch(folder: Path) -> None:
    try:
        os.utime(folder)
    except OSError:  # a read-only cache: it still serves, it just is not reordered
        pass


def _evict(root: Path, keep: int, abandoned_after: float = 86400.0, grace: float = 600.0) -> None:
    """All but the ``keep`` most recently used engine folders under ``root`` removed, and any build folder (a
    dot-folder) left for a day by a process that died while building.

    A folder used in the last ``grace`` seconds stays whatever its rank: another process may be loading it.
    """
    now = time.time()
    entries: list[tuple[float, Path]] = []
    for path in root.iterdir():
        try:
            if not path.is_dir():
                continue
            used = path.stat().st_mtime
        except OSError:  # removed meanwhile by another process
            continue
        if path.name.startswith("."):
            if now - used > abandoned_after:
                shutil.rmtree(path, ignore_errors=True)
            continue
        entries.append((used, path))
    for used, path in sorted(entries, reverse=True)[keep:]:
        if now - used > grace:
            shutil.rmtree(path, ignore_errors=True)


def calibration_images(train, count: int, mean, std) -> Tensor:
    """``count`` seeded training images (the same ones every time), normalised as for evaluation: what an int8
    engine is calibrated on. ``train`` is an in-memory split (uint8 images) or a streamed data set."""
    from densenet.data.augment import normalize

    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:count]
    if hasattr(train, "images"):
        return normalize(train.images[pick], mean, std)
    return torch.stack([train[i][0] for i in pick.tolist()])

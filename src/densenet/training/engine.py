"""One epoch of training and one pass of evaluation, for in-memory and streamed data alike.

In-memory sets (``Split``) are shuffled by a generator derived from (seed, epoch), cut into per-rank
batches, and augmented on the device (``densenet.data.augment``); streamed sets come from a DataLoader
whose sampler is seeded the same way. Nothing depends on state carried from one epoch to the next
except the model and optimiser, which is what makes a resumed run exactly equal to an uninterrupted one.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from densenet.data.augment import alternate_flips, augment_batch, check_tta, normalize, pad_crop_flip, tta_views
from densenet.data.datasets import Data, Split, worker_error_message
from densenet.data.task import Task
from densenet.devices import autocast
from densenet.errors import DenseNetError
from densenet.training.distributed import Dist, all_sum, broadcast_flag


class NonFiniteLoss(DenseNetError):
    """The loss became NaN or infinite; training stops and the last good checkpoint stays."""


@dataclass
class Stats:
    loss: float
    error: float  # percent: top-1 (multiclass); at 0.5 for binary and multilabel (see ``sigmoid_errors``)
    top5_error: float
    n: int
    seconds: float
    # binary and multilabel evaluations: ``densenet.data.metrics.compute_metrics`` (auroc, acc, map, ...)
    metrics: dict[str, float] = field(default_factory=dict)
    # binary and multilabel evaluations: (targets, probabilities) on the CPU, for thresholds chosen on validation
    outputs: tuple[torch.Tensor, torch.Tensor] | None = None


def epoch_seed(seed: int, epoch: int, rank: int = 0, stream: int = 0) -> int:
    """A distinct, reproducible seed for each (run seed, epoch, rank, purpose)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + stream) % (2**63 - 1)


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world``-th index from ``rank`` (shuffled per epoch when training): no padding, no repeats."""

    def __init__(self, n: int, info: Dist, shuffle: bool, seed: int = 0) -> None:
        self.n, self.info, self.shuffle, self.seed, self.epoch = n, info, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, stream=1))
            order = torch.randperm(self.n, generator=g)
            order = order[: self.n - self.n % self.info.world_size]  # equal step counts on every rank
        else:
            order = torch.arange(self.n)
        return order[self.info.rank::self.info.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


class Batches:
    """The (input, label) batches of one split for one epoch, on the device and normalised."""

    def __init__(self, data: Data, split: Split | torch.utils.data.Dataset, batch_size: int, info: Dist,
                 device: torch.device, *, train: bool, augment: bool = False, seed: int = 0, workers: int = 0,
                 channels_last: bool = False, crop_padding: int = 4, flip: str = "random") -> None:
        self.crop_padding = crop_padding
        self.first_flips = None  # --flip alternate: each image's flip in even epochs, the same on every rank
        if flip == "alternate" and augment and isinstance(split, Split):
            g = torch.Generator().manual_seed(epoch_seed(seed, 0, stream=3))
            self.first_flips = torch.rand(len(split), generator=g) < 0.5
        self.crop_size: int | None = None  # smaller random crops (progressive resizing), set per epoch
        self.data, self.split, self.batch_size, self.info, self.device = data, split, batch_size, info, device
        self.train, self.augment, self.seed, self.channels_last = train, augment, seed, channels_last
        self.sampler = ShardSampler(len(split), info, shuffle=train, seed=seed)
        self.loader = None
        if not isinstance(split, Split):
            self.loader = torch.utils.data.DataLoader(
                split, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                pin_memory=device.type == "cuda", drop_last=False, persistent_workers=workers > 0)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def images(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        if self.loader is not None:
            try:
                for x, y in self.loader:
                    yield self._finish(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
            except DenseNetError as exc:  # re-raised from a worker: keep the file name, drop the traceback
                raise DenseNetError(worker_error_message(exc)) from None
            return
        order = torch.tensor(self.sampler._indices(), dtype=torch.long)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, self.info.rank, stream=2))
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            x = self.split.images[index].to(self.device, non_blocking=True)
            if self.augment and x.dim() == 5:  # volumes (N, C, D, H, W): shifts and flips along every axis
                x = augment_batch(x, generator)
            elif self.augment:
                flips = None if self.first_flips is None else alternate_flips(self.first_flips, index, epoch)
                x = pad_crop_flip(x, generator, self.crop_padding, self.crop_size, flips=flips)
            yield self._finish(normalize(x, self.data.mean, self.data.std)), self.split.labels[index].to(self.device)

    @property
    def padding_value(self) -> torch.Tensor:
        """Per channel, what a zero (black) pixel of the raw images becomes once normalised."""
        return normalize(torch.zeros(1, len(self.data.mean), 1, 1, dtype=torch.uint8), self.data.mean,
                         self.data.std).view(-1).to(self.device)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def train_one_epoch(model: torch.nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, epoch: int,
                    device: torch.device, info: Dist, amp: str = "none", scaler=None, quiet: bool = False,
                    total_epochs: int | None = None, *, forward: Callable | None = None,
                    scheduler=None, label_smoothing: float = 0.0, loss_fn: Callable | None = None,
                    task: Task | None = None) -> Stats:
    """One pass over the training batches. ``forward`` (default: ``model``) computes the logits, e.g. the
    compiled module of training/fast.py; ``scheduler``, when given, is stepped after every optimiser step.

    ``loss_fn`` (default: cross-entropy with ``label_smoothing``) is the task's loss (``Task.loss``: BCE with
    logits for binary and multilabel); ``task`` decides the train error: top-1 for multiclass (the default), the
    fraction of label entries wrong at probability 0.5 (MedMNIST's ACC) for binary and multilabel. Either way it
    costs the one ``.item()`` per step the multiclass error always took."""
    model.train()
    sigmoid = task is not None and task.sigmoid
    forward = forward or model
    loss_sum = correct = seen = 0.0
    start = time.perf_counter()
    show = not quiet and info.is_main and sys.stderr.isatty()
    log_lines = not quiet and info.is_main and not show  # a log file: a plain line a minute instead of a bar
    last_log = start
    total = batches.images() * info.world_size
    label = f"epoch {epoch + 1}" + (f"/{total_epochs}" if total_epochs else "")
    with tqdm(total=total, desc=label, unit="img", disable=not show,
              leave=False, dynamic_ncols=True) as bar:
        for step, (x, y) in enumerate(batches.epoch(epoch)):
            with autocast(device, amp):
                logits = forward(x)
                loss = (F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing) if loss_fn is None
                        else loss_fn(logits, y))
            bad = not bool(torch.isfinite(loss))
            if broadcast_flag(bad, info, device):
                raise NonFiniteLoss(f"the loss became {loss.item() if bad else 'non-finite on another rank'} "
                                    f"at epoch {epoch + 1}, step {step + 1}; stopped, the last good checkpoint "
                                    f"stays (try a lower --lr, or --amp none)")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            n = y.shape[0]
            loss_sum += loss.item() * n
            if sigmoid:  # per image, the fraction of its label entries right at 0.5 (logit 0)
                correct += ((logits.detach() > 0) == (y.reshape(logits.shape) > 0.5)).float().mean(1).sum().item()
            else:
                correct += (logits.argmax(1) == y).sum().item()
            seen += n
            bar.update(n * info.world_size)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
            now = time.perf_counter()
            if log_lines and now - last_log > 60:
                last_log = now
                done = int(seen) * info.world_size
                rate = done / (now - start)
                print(f"  {label}: {done}/{total} images, {rate:.0f} img/s, loss {loss_sum / seen:.3f}, "
                      f"~{(total - done) / max(rate, 1e-9) / 60:.1f} min left", flush=True)
    loss_sum, correct, seen = all_sum([loss_sum, correct, seen], info, device)
    seen = max(seen, 1)
    return Stats(loss_sum / seen, 100.0 * (1 - correct / seen), float("nan"), int(seen), time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Batches, device: torch.device, info: Dist,
             amp: str = "none", *, forward: Callable | None = None, tta: str = "none",
             task: Task | None = None, threshold=0.5) -> Stats:
    """Loss, top-1 and top-5 error (percent) over the whole split; ten-crop inputs (B, 10, C, H, W) averaged.

    ``tta`` ("flip", "flip-shift": data/augment.py) averages the softmax over views of each image, as ten-crop
    does over its crops. ``forward`` (default: ``model``) computes the logits, one view of the whole batch at a
    time: every call has the batch's size (the one the compiled evaluation graph is built for), and a CPU runs
    six batches of 256 faster than one of 1536: in `make cifar10-cpu` (2-core AMD EPYC, 2026-11-30, metrics.csv
    of docs/runs/cifar10-densenet_bc40_k12-cpu and of its previous version, 7f28554) the six-view evaluation
    took about 76 s this way against about 110 s as one call.

    A binary or multilabel ``task`` (``Task.sigmoid``) is measured by ``densenet.data.metrics.compute_metrics``
    (AUROC, ACC, mAP, Hamming, F1: ``Stats.metrics``, at ``threshold``) on the sigmoid probabilities of the
    whole split, views averaged as probabilities; the loss is the unweighted BCE of those probabilities and
    ``Stats.outputs`` keeps (targets, probabilities) on the CPU. Multiclass (the default) is measured as it
    always was: loss, top-1, top-5, nothing slower. Volumes (N, C, D, H, W) of a 3D set are single views;
    ``tta`` "flip" averages each volume and its mirror along the last axis.
    """
    model.eval()
    forward = forward or model
    volumes = getattr(getattr(batches, "data", None), "spatial_dims", 2) == 3
    check_tta(tta, volumes)
    if task is not None and task.sigmoid:
        return _evaluate_sigmoid(batches, device, info, amp, forward, tta, task, volumes, threshold)
    loss_sum = top1 = top5 = seen = 0.0
    start = time.perf_counter()
    for x, y in batches.epoch(0):
        x, views = _views(x, batches, tta, volumes)
        with autocast(device, amp):
            if views:
                logits = _view_average(x, views, batches, forward, lambda z: z.float().softmax(-1)).log()
            else:
                logits = forward(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == y[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        seen += y.shape[0]
    loss_sum, top1, top5, seen = all_sum([loss_sum, top1, top5, seen], info, device)
    n = max(seen, 1)
    return Stats(loss_sum / n, 100.0 * (1 - top1 / n), 100.0 * (1 - top5 / n), int(seen), time.perf_counter() - start)


def _views(x: torch.Tensor, batches: Batches, tta: str, volumes: bool) -> tuple[torch.Tensor, int]:
    """The batch as views to average (B, V, C, H, W) and their count V: ten crops as they come, or the views of
    ``tta``; (x, 0) for a batch that is one view (a 5D batch of volumes is not views)."""
    views = x.shape[1] if x.dim() == 5 and not volumes else 0
    if tta != "none":
        x = tta_views(x, tta, batches.padding_value, volumes)
        views = x.shape[1]
    return x, views


def _view_average(x: torch.Tensor, views: int, batches: Batches, forward: Callable, probabilities: Callable
                  ) -> torch.Tensor:
    """The probabilities (softmax or sigmoid) averaged over the views, one view of the whole batch per call."""
    return sum(probabilities(forward(batches._finish(x[:, v]))) for v in range(views)) / views


def _evaluate_sigmoid(batches: Batches, device: torch.device, info: Dist, amp: str, forward: Callable,
                      tta: str, task: Task, volumes: bool, threshold) -> Stats:
    """``evaluate`` for binary and multilabel tasks: every probability kept, measured once at the end."""
    from densenet.data.metrics import compute_metrics

    start = time.perf_counter()
    all_probs, all_targets = [], []
    for x, y in batches.epoch(0):
        x, views = _views(x, batches, tta, volumes)
        with autocast(device, amp):
            if views:
                probs = _view_average(x, views, batches, forward, task.probabilities)
            else:
                probs = task.probabilities(forward(x))
        all_probs.append(probs.float().cpu())
        all_targets.append(y.cpu())
    probs = torch.cat(all_probs) if all_probs else torch.zeros(0, task.num_outputs)
    targets = torch.cat(all_targets) if all_targets else torch.zeros(0)
    if info.enabled:  # every rank measures the whole split (its share alone would give other AUROCs)
        import torch.distributed as dist

        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, (probs, targets))
        probs = torch.cat([p for p, _ in gathered])
        targets = torch.cat([t for _, t in gathered])
    n = int(targets.shape[0])
    if n == 0:
        return Stats(math.nan, math.nan, math.nan, 0, time.perf_counter() - start)
    y = targets.to(torch.float64).reshape(probs.shape)
    p = probs.to(torch.float64)
    loss = float(F.binary_cross_entropy(p.clamp(1e-12, 1 - 1e-12), y)) if bool(torch.isfinite(p).all()) \
        else math.nan
    metrics = compute_metrics(task, targets, probs, threshold) if math.isfinite(loss) else {}
    error = metrics.get("error", math.nan)
    return Stats(loss, error, math.nan, n, time.perf_counter() - start, metrics, (targets, probs))

"""``densenet train``: the paper's training protocol on any data set, into a run folder.

    densenet train                                         # DenseNet-BC on the built-in digits, a few minutes
    densenet train --config configs/c10plus-densenet40_k12.yaml --data-dir data/cifar10
    densenet train --resume runs/cifar10-densenet40_k12-20260101-120000
    torchrun --nproc_per_node 8 -m densenet train --config configs/imagenet-densenet121.yaml --data-dir /imagenet

Flags override the recipe; the resolved options go to RUN_DIR/config.yaml and into every checkpoint. The flags
are TrainOptions' fields (training/options.py), plus --config, --eager and --resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from densenet.data.augment import check_tta
from densenet.data.datasets import Data, load_data, subset
from densenet.devices import resolve_device
from densenet.errors import ConfigError, DenseNetError
from densenet.models import create_model, set_block_impl
from densenet.models.densenet import DenseBlock
from densenet.training import distributed, fast, run_folder, tasks
from densenet.training.checkpoint import BEST, LAST, latest_checkpoint, load_checkpoint, save_checkpoint
from densenet.training.engine import Batches, NonFiniteLoss, Stats, epoch_seed, evaluate, train_one_epoch
from densenet.training.options import TrainOptions, flag_name, read_recipe, resolve_options, resume_changes
from densenet.training.schedule import build_optimizer, build_scheduler, per_step


def _resolve_device(options: TrainOptions) -> torch.device:
    device = resolve_device(options.device)
    if options.amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA (its gradient scaler); on CPU use --amp bf16 or none")
    return device


def _build_model(options: TrainOptions, data: Data) -> torch.nn.Module:
    stem = {"stem": options.stem} if options.stem else {}
    model = create_model(options.model, **tasks.model_shape(data), drop_rate=options.drop_rate,
                         memory_efficient=options.memory_efficient, **stem)
    if options.init:
        from densenet.models.weights import load_into, read_state_dict

        state = read_state_dict(options.init)
        conv0 = state.get("features.conv0.weight")
        if conv0 is not None and conv0.dim() == 4 and conv0.shape[1] == 3 and data.in_chans != 3:
            from densenet.models.pretrained import adapt_input_conv  # RGB filters for gray images, as timm does

            state = {**state, "features.conv0.weight": adapt_input_conv(data.in_chans, conv0)}
        elif conv0 is not None and conv0.dim() >= 2 and conv0.shape[1] != data.in_chans:
            raise ConfigError(f"--init {options.init} takes {conv0.shape[1]}-channel images, but {data.name} has "
                              f"{data.in_chans}-channel images")
        own = model.state_dict()
        # Fine-tuning on other classes: keep everything but a classifier of the wrong size.
        state = {k: v for k, v in state.items() if not (k.startswith("classifier.") and k in own
                                                          and v.shape != own[k].shape)}
        strict = all(k in state for k in own)
        load_into(model, state, source=options.init, strict=strict)
        missing = [k for k in own if k not in state]
        if missing and not all(k.startswith("classifier.") for k in missing):
            raise DenseNetError(f"--init {options.init} does not fit {options.model}: {len(missing)} tensors "
                                f"missing (e.g. {missing[0]})")
    return model


def eval_size(options: TrainOptions, per_rank: int) -> int:
    """Images per evaluation batch on one process: twice the training batch (no gradients are kept), except
    with --memory-efficient. There the evaluation would set the process's peak: the transitions of a plain
    forward pass hold a block's output, its BN-ReLU and the convolution's output at once (for DenseNet-BC-250
    k=24 at 128 images, 541 MB each after the first block), and the batch-64 training process measured 3.1 GB
    in its training steps but up to 4.2 GB in evaluation batches of 128 (docs/memory.md). A user who asked for
    less memory gets evaluation batches of the training batch's size."""
    return per_rank if options.memory_efficient else per_rank * 2


def _input_size(data: Data) -> int | None:
    """The side evaluate and predict bring inputs to: None for volumes that are not cubes (a CSV set of such
    volumes trains at their own shape, and evaluation must not resize them to a cube of one side)."""
    images = getattr(data.test, "images", None)
    if data.spatial_dims == 3 and images is not None and len(set(images.shape[2:])) > 1:
        return None
    return int(data.input_size)


def _metadata(options: TrainOptions, data: Data, model: torch.nn.Module) -> dict[str, Any]:
    return {"model": options.model, "config": dict(model.config), "classes": list(data.classes),
            "mean": list(data.mean), "std": list(data.std), "input_size": _input_size(data),
            "dataset": data.name, "memory_efficient": False, "tta": options.tta, "task": data.task.to_dict()}


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Every random number of an epoch follows from (seed, epoch, rank): a resumed run repeats them exactly."""
    s = epoch_seed(seed, epoch, rank)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def train(recipe: str | None = None, overrides: dict[str, Any] | None = None,
          resume: str | None = None, fork: str | None = None) -> dict[str, Any]:
    """Run (or continue) a training; returns the final summary. Raises DenseNetError on bad input.

    ``fork`` (with ``resume``): copy the run into this new folder and continue it there, where the options given
    may change it (another learning rate, more epochs of a one-cycle schedule); the original stays as it was.
    """
    if fork and not resume:
        raise ConfigError("--fork NEW_DIR continues a copy of a run: give the run with --resume RUN")
    with contextlib.ExitStack() as held:  # the run folder's lock, released however this ends
        held.enter_context(fast.inductor_cache())  # inductor's cache folder for this run, the caller's after it
        return _train_locked(held, recipe, overrides, resume, fork)


def _train_locked(held: contextlib.ExitStack, recipe: str | None, overrides: dict[str, Any] | None,
                  resume: str | None, fork: str | None) -> dict[str, Any]:
    checkpoint = None
    main = os.environ.get("RANK", "0") == "0"  # only rank 0 writes, so only it locks the folder
    restarted = None if resume else _restarted_run(recipe, overrides)
    if restarted is not None and latest_checkpoint(restarted) is not None:
        resume = str(restarted)  # torchrun restarted the job after a failure: continue from the last checkpoint
    if resume:
        run_dir = Path(resume)
        source_lock = None
        if main and run_dir.is_dir() and (run_dir / "config.yaml").is_file():
            source_lock = held.enter_context(run_folder.RunLock(run_dir, "--resume"))  # before anything is written
        path = latest_checkpoint(run_dir) if run_dir.is_dir() else None
        if path is None:
            if (run_dir / LAST).is_file():
                load_checkpoint(run_dir / LAST)  # raises why it is unusable: torn, or unsafe to unpickle
            raise DenseNetError(f"--resume {run_dir}: no readable {LAST} there (is it a run folder?)")
        checkpoint = load_checkpoint(path)
        if main and path.name != LAST:
            _announce_fallback(run_dir, path, int(checkpoint["epoch"]))
        if restarted is not None and main:
            _say(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming {run_dir} after epoch "
                 f"{checkpoint['epoch']} (its last checkpoint)")
        overrides = _resume_overrides(run_dir, checkpoint, recipe, overrides, fork, say=_say if main else None)
        if fork:
            overrides["out"] = fork
        options = resolve_options(None, overrides, base=checkpoint["config"])  # the recipe's values are in overrides
        if fork:
            run_dir = Path(fork)
            if main:
                _fork_into(run_dir, path, held)
                if source_lock is not None:
                    source_lock.release()  # the copy is made: the original may be resumed again
        elif int(checkpoint["epoch"]) >= options.epochs and not (run_dir / run_folder.WEIGHTS).is_file():
            # killed after the last checkpoint, before model.safetensors: write it rather than "already finished"
            return run_folder.finish_from_checkpoint(run_dir, checkpoint, f"{options.model} on {options.dataset}",
                                                     options.info.get("paper_error"))
        resume = str(run_dir)
    else:
        options = resolve_options(recipe, overrides)
    device = _resolve_device(options)
    threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    info, device = distributed.setup(device)
    try:
        return _train(options, device, info, checkpoint, Path(resume) if resume else restarted, held, bool(fork))
    finally:
        distributed.cleanup()
        torch.set_num_threads(threads)  # a caller in the same process (a notebook, the tests) keeps its setting


def _announce_fallback(run_dir: Path, path: Path, epoch: int) -> None:
    """Say why the resume continues from another checkpoint than checkpoint_last.pt, and from which epoch."""
    why = f"{run_dir / LAST} does not exist"
    if (run_dir / LAST).is_file():
        try:
            last = load_checkpoint(run_dir / LAST)
            why = f"{run_dir / LAST} holds an earlier epoch ({last.get('epoch')})"
        except DenseNetError as exc:
            why = (f"refusing {run_dir / LAST} (it could run code)" if "could run code" in str(exc)
                   else f"{run_dir / LAST} is not a readable checkpoint (truncated or corrupt?)")
    _say(f"{why}: resuming from {path} (epoch {epoch}) instead")


def _resume_overrides(run_dir: Path, checkpoint: dict, recipe: str | None, overrides: dict[str, Any] | None,
                      fork: str | None, say) -> dict[str, Any]:
    """The options given again to --resume that it applies; the run's own (its checkpoint's) stand for the rest.

    Says what it keeps and what it ignores: values given again unchanged, and a config.yaml edited since the
    run began (the checkpoint, not config.yaml, is what a run continues with). A value that would change the
    run (another --lr, --model, --seed...) is refused unless ``fork`` names a new folder to continue a copy in.
    """
    saved = dict(checkpoint["config"])
    given = dict(read_recipe(recipe)) if recipe else {}
    given.update({k: v for k, v in (overrides or {}).items() if v is not None})
    out = given.pop("out", None)
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise ConfigError(f"--out {out} with --resume {run_dir}: a resumed run continues in its own folder; "
                          f"--fork {out} continues a copy of it there")
    same, free, changing = resume_changes(saved, given)
    if changing and not fork:
        shown = ", ".join(f"{flag_name(k)} {given[k]!r} (the run's: {saved.get(k)!r})" for k in changing)
        raise ConfigError(f"--resume {run_dir} continues the run as it was, and {shown} would change it: drop "
                          f"{'it' if len(changing) == 1 else 'them'}, or add --fork NEW_DIR to continue a copy "
                          f"of the run with {'it' if len(changing) == 1 else 'them'}")
    if say is not None:
        applied = free + (changing if fork else [])
        words = [f"resuming {run_dir} after epoch {checkpoint['epoch']} with the options saved in its checkpoint"]
        if applied:
            words.append("changed: " + ", ".join(f"{flag_name(k)} {given[k]}" for k in applied))
        if same:
            words.append("given again, unchanged: " + ", ".join(flag_name(k) for k in same))
        say("; ".join(words))
        edited = run_folder.edited_config(run_dir, saved)
        if edited:
            say(f"{run_dir / 'config.yaml'} differs from the run's checkpoint ({', '.join(edited)}): ignored, a "
                f"resumed run keeps its checkpoint's options; to train with it, --fork NEW_DIR --config "
                f"{run_dir / 'config.yaml'}")
    return {k: given[k] for k in (free + changing) if k in given}


def _fork_into(new_dir: Path, checkpoint_path: Path, held: contextlib.ExitStack) -> None:
    """Copy the run's checkpoints and metrics into ``new_dir`` (new or empty), locked, for the run to go on there."""
    if new_dir.exists() and (not new_dir.is_dir() or any(new_dir.iterdir())):
        raise ConfigError(f"--fork {new_dir} must be a new or empty folder")
    run_folder.make_run_dir(new_dir)

    def undo(exc_type, exc, tb) -> None:  # refused before the run began there (another model...): no half a fork
        if exc_type is not None and not (new_dir / "config.yaml").exists():
            shutil.rmtree(new_dir, ignore_errors=True)

    held.push(undo)
    held.enter_context(run_folder.RunLock(new_dir, "--fork"))
    source = checkpoint_path.parent
    shutil.copyfile(checkpoint_path, new_dir / LAST)
    for name in (BEST, "metrics.csv"):
        if (source / name).is_file():
            shutil.copyfile(source / name, new_dir / name)
    _say(f"forked {source} (epoch {load_checkpoint(new_dir / LAST)['epoch']}) into {new_dir}")


def _forked_schedule(model: torch.nn.Module, optimizer: torch.optim.Optimizer, options: TrainOptions,
                     checkpoint: dict, steps_per_epoch: int, start_epoch: int):
    """A forked run keeps the weights and momentum buffers, but its rates follow its own options: the schedule is
    built anew and advanced to ``start_epoch`` (a loaded scheduler state would bring back the old rates)."""
    from densenet.training.schedule import build_optimizer

    fresh = build_optimizer(model, options)
    with contextlib.suppress(ValueError, KeyError):  # other parameter groups (--weight-decay-on): no momentum kept
        optimizer.load_state_dict(checkpoint["optimizer"])
    for group, new in zip(optimizer.param_groups, fresh.param_groups, strict=True):
        for key in ("lr", "momentum", "weight_decay", "nesterov", "dampening"):
            group[key] = new[key]
        for key in ("initial_lr", "max_lr", "min_lr"):
            group.pop(key, None)
    scheduler = build_scheduler(optimizer, options, steps_per_epoch=steps_per_epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": only its clock is replayed
        for _ in range(start_epoch * (steps_per_epoch if per_step(options) else 1)):
            scheduler.step()
    return scheduler


def _restarted_run(recipe: str | None, overrides: dict[str, Any] | None) -> Path | None:
    """--out, when torchrun (--max-restarts) started this job again after a failure and --out holds its run.

    The run is recognised by its config.yaml holding exactly this command's options, so a restarted job
    never continues another run's folder (that keeps the usual "already holds a run" error).
    """
    out = (overrides or {}).get("out")
    if not out or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    try:
        saved = yaml.safe_load((Path(out) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if isinstance(saved, dict):
        saved.pop("runtime", None)  # what the path was (training/fast.py), not an option
        saved.pop("task", None)  # what the data are (training/tasks.py), not an option
    return Path(out) if saved == resolve_options(recipe, overrides).to_dict() else None


@dataclass
class _Run:
    """Everything a run's epoch loop needs, as ``_setup`` prepared it: the data, the model and its training path,
    the optimiser and schedule (restored when resuming), the batches, and the run folder."""

    data: Data
    model: torch.nn.Module
    net: torch.nn.Module  # the model, wrapped in DDP under torchrun
    runtime: fast.Runtime
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    loss_fn: torch.nn.Module
    train_batches: Batches
    eval_batches: dict[str, Batches]
    train_forward: Any
    eval_forward: Any
    start_epoch: int
    history: list[dict]
    best: dict
    run_dir: Path
    metadata: dict[str, Any]
    board: Any


def _train(options: TrainOptions, device: torch.device, info: distributed.Dist, checkpoint: dict | None,
           run_dir: Path | None, held: contextlib.ExitStack, forked: bool = False) -> dict[str, Any]:
    run = _setup(options, device, info, checkpoint, run_dir, held, forked)
    try:
        _epochs(run, options, device, info)
    finally:
        if run.board is not None:
            run.board.close()
    if run.data.task.kind != "multiclass":  # selection on validation, test once (training/tasks.py)
        def measure(name: str, threshold) -> Stats:
            return evaluate(run.model, run.eval_batches[name], device, info, run.runtime.amp,
                            forward=run.eval_forward, tta=options.tta, task=run.data.task, threshold=threshold)

        return _finish_task(options, run.model, run.data, run.run_dir, run.history, run.best, run.metadata, info,
                            measure)
    return _finish(options, run.model, run.data, run.run_dir, run.history, run.best, run.metadata, info)


def _load_checked(options: TrainOptions, run_dir: Path | None) -> Data:
    """The data set, checked against what the options ask of it (classes, subset, small crops, flips)."""
    data = load_data(options.dataset, options.data_dir, augment=options.augment, download=bool(options.download),
                     input_size=options.input_size, seed=options.seed, split_file=tasks.split_file(run_dir))
    if data.num_classes < 2:
        raise ConfigError(f"{data.name} has {data.num_classes} class{'es' if data.num_classes != 1 else ''} "
                          f"({', '.join(data.classes) or 'none'}): a classifier needs at least two (a folder data set "
                          f"takes one subfolder per class)")
    if options.train_subset:
        if not data.in_memory:
            raise ConfigError(f"--train-subset is for the in-memory data sets (digits, cifar, svhn), not {data.name}")
        data.train = subset(data.train, options.train_subset, options.seed)
    # --small-crop and --flip alternate act in the on-device augmentation of in-memory sets (data/augment.py)
    augmented_in_memory = data.in_memory and options.augment == "standard"
    if options.small_crop_epochs:
        side = min(data.train.images.shape[2:]) if augmented_in_memory else None
        if side is None or options.small_crop > side:
            raise ConfigError(f"--small-crop {options.small_crop}: needs an in-memory data set with standard "
                              f"augmentation and images of at least that side" + (f" (these are {side})"
                                                                                   if side else ""))
    check_tta(options.tta, data.spatial_dims == 3)
    if options.flip == "alternate" and not augmented_in_memory:
        raise ConfigError(f"--flip alternate: needs an in-memory data set (digits, cifar, svhn) with standard "
                          f"augmentation, not {data.name} with --augment {options.augment}")
    return data


def _setup(options: TrainOptions, device: torch.device, info: distributed.Dist, checkpoint: dict | None,
           run_dir: Path | None, held: contextlib.ExitStack, forked: bool) -> _Run:
    """The data, model, training path, optimiser, batches and run folder of a run (or of a resumed one); the run
    folder is created, locked and given its config.yaml only after all of these were checked."""
    per_rank = distributed.per_rank_batch(options.batch_size, info)
    data = _load_checked(options, run_dir)
    torch.manual_seed(options.seed)
    model = _build_model(options, data).to(device)
    train_batches = Batches(data, data.train, per_rank, info, device, train=True,
                            augment=options.augment == "standard", seed=options.seed, workers=options.workers,
                            crop_padding=options.crop_padding, flip=options.flip)
    runtime = fast.plan(options, device, total_steps=len(train_batches) * options.epochs, distributed=info.enabled,
                        spatial_dims=data.spatial_dims)
    if runtime.timed:  # a long CPU run: which path is fastest here is measured (training/fast.py)
        shape = (tuple(data.train.images.shape[1:]) if data.in_memory
                 else (data.in_chans, options.input_size or 224, options.input_size or 224))
        runtime = fast.time_paths(model, runtime, shape, data.task.num_outputs, per_rank,
                                  say=_say if info.is_main else lambda _: None)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if any(isinstance(m, DenseBlock) for m in model.modules()):
        set_block_impl(model, runtime.block_impl)  # the dense blocks' implementation for this path (fast.py)
    else:  # a comparison network (models/resnet.py): no dense blocks to choose for
        runtime = dataclasses.replace(runtime, block_impl=None)
    optimizer = build_optimizer(model, options)
    scheduler = build_scheduler(optimizer, options, steps_per_epoch=len(train_batches))
    scaler = torch.amp.GradScaler("cuda") if options.amp == "fp16" else None
    loss_fn = tasks.build_loss(data, device, options.label_smoothing, getattr(options, "pos_weight", "none"))
    start_epoch, history, best = 0, [], tasks.initial_best(data.task, has_val=data.val is not None)
    if checkpoint is not None:
        from densenet.models.weights import load_into

        load_into(model, checkpoint["model"], source=f"{run_dir}/{LAST}")
        if forked:
            scheduler = _forked_schedule(model, optimizer, options, checkpoint, len(train_batches),
                                         int(checkpoint["epoch"]))
        else:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, history, best = int(checkpoint["epoch"]), list(checkpoint["history"]), dict(checkpoint["best"])
    if start_epoch >= options.epochs:
        raise ConfigError(f"the run in {run_dir} already finished {start_epoch} epochs; "
                          f"pass a larger --epochs to continue it")
    net = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    train_batches.channels_last = runtime.channels_last
    eval_batch = eval_size(options, per_rank)
    eval_batches = {name: Batches(data, split, eval_batch, info, device, train=False, workers=options.workers,
                                  channels_last=runtime.channels_last)
                    for name, split in (("val", data.val), ("test", data.test)) if split is not None}
    train_forward = eval_forward = None
    if runtime.compile:  # one graph per mode (evaluation: one view of eval_batch images at a time)
        say = _say if info.is_main else lambda _: None
        train_forward = fast.StaticBatchModule(net, {per_rank}, say=say)
        eval_forward = fast.StaticBatchModule(model, {eval_batch}, say=say)
    metadata = _metadata(options, data, model)
    run_dir, board = _open_run_dir(options, data, runtime, run_dir, held, info, device)
    return _Run(data, model, net, runtime, optimizer, scheduler, scaler, loss_fn, train_batches, eval_batches,
                train_forward, eval_forward, start_epoch, history, best, run_dir, metadata, board)


def _open_run_dir(options: TrainOptions, data: Data, runtime: fast.Runtime, run_dir: Path | None,
                  held: contextlib.ExitStack, info: distributed.Dist, device: torch.device) -> tuple[Path, Any]:
    """The run folder (a new one when ``run_dir`` is None), created, locked, and given its config.yaml and split
    by rank 0 only after every option and the data were checked; its TensorBoard writer (rank 0, else None)."""
    new = run_dir is None
    if new:  # only rank 0 writes (or checks) the folder; a rank checking after rank 0 wrote would fail
        run_dir = (run_folder.new_run_dir(options.out, options.dataset, options.model) if info.is_main
                   else Path(options.out or "runs"))
    board = None
    if info.is_main:  # created only now, after every option and the data were checked
        run_folder.make_run_dir(run_dir)
        if new or not (run_dir / run_folder.LOCK).is_file() or run_folder.lock_held(run_dir) is None:
            # a new run (or a torchrun restart before any checkpoint): lock, then check again under the lock
            held.enter_context(run_folder.RunLock(run_dir, "--out"))
            if new:
                run_folder.check_out(run_dir, locked=True)
        run_folder.write_config(run_dir, options.to_dict() | {"runtime": runtime.to_dict(),
                                                              "task": data.task.to_dict()})
        tasks.write_split(run_dir, data)
        board = run_folder.TensorBoard(run_dir)
        _say(f"training {options.model} on {options.dataset} ({len(data.train)} images, {data.num_classes} "
             f"{'labels' if data.task.kind == 'multilabel' else 'classes'}) for {options.epochs} epochs on {device}"
             + (f" x {info.world_size} processes" if info.enabled else "") + f" -> {run_dir}")
        _say(f"path: {'compiled' if runtime.compile else 'eager'}, "
             f"{'channels_last' if runtime.channels_last else 'NCHW'}, {runtime.threads} threads, "
             f"precision {'fp32' if runtime.amp == 'none' else runtime.amp} ({runtime.reason})"
             + (f"; dense blocks: {runtime.block_impl}" if runtime.block_impl else ""))
    return run_dir, board


def _epochs(run: _Run, options: TrainOptions, device: torch.device, info: distributed.Dist) -> None:
    """The epoch loop: train, evaluate when due, checkpoint (rank 0), from ``run.start_epoch`` to the last."""
    data, model, optimizer, scheduler, history = run.data, run.model, run.optimizer, run.scheduler, run.history
    for epoch in range(run.start_epoch, options.epochs):
        _seed_epoch(options.seed, epoch, info.rank)
        lr = optimizer.param_groups[0]["lr"]
        run.train_batches.crop_size = options.small_crop if epoch < options.small_crop_epochs else None
        stats = train_one_epoch(run.net, run.train_batches, optimizer, epoch, device, info, run.runtime.amp,
                                run.scaler, options.quiet, options.epochs, forward=run.train_forward,
                                scheduler=scheduler if per_step(options) else None,
                                label_smoothing=options.label_smoothing, loss_fn=run.loss_fn, task=data.task)
        if not per_step(options):
            scheduler.step()
        # The bare model: ranks may see different numbers of test batches, and DDP's forward would sync.
        evaluated = (epoch + 1) % options.eval_every == 0 or epoch + 1 == options.epochs
        results = {name: evaluate(model, run.eval_batches[name], device, info, run.runtime.amp,
                                  forward=run.eval_forward, tta=options.tta, task=data.task)
                   for name in tasks.evaluated_splits(data.task, list(run.eval_batches))} if evaluated else {}
        if not all(math.isfinite(r.loss) for r in results.values()):  # finite training loss, diverged weights
            raise NonFiniteLoss(f"the {'/'.join(results)} loss became non-finite after epoch {epoch + 1}: the "
                                f"weights diverged; stopped without saving them, the last good checkpoint "
                                f"stays (try a lower --lr, or --amp none)")
        row = _row(epoch, lr, stats, results, data)
        history.append(row)
        improved = tasks.improved(run.best, row)
        if improved:
            run.best = tasks.chosen(run.best, row)
        if info.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": run.scaler.state_dict() if run.scaler else None,
                     "epoch": epoch + 1, "config": options.to_dict(), "rng": _rng_state(), "best": run.best,
                     "history": history, "metadata": run.metadata, "model_config": dict(model.config)}
            save_checkpoint(run.run_dir / LAST, state)
            if improved:
                save_checkpoint(run.run_dir / BEST, state)
            run_folder.write_metrics(run.run_dir, history)
            run.board.log(row)
            if stats.seconds > 20:
                run_folder.write_curves(run.run_dir, history, f"{options.model} on {options.dataset}")
            _say(_summary(row, options.epochs, stats))
        distributed.barrier(info)


def _row(epoch: int, lr: float, stats: Stats, results: dict[str, Stats], data: Data) -> dict[str, float]:
    """One line of metrics.csv; an epoch without evaluation (--eval-every) has no test or validation columns."""
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": stats.loss, "train_error": stats.error,
           "seconds": round(stats.seconds + sum(r.seconds for r in results.values()), 2)}
    return row | tasks.result_columns(data.task, results)


def _summary(row: dict[str, float], epochs: int, stats: Stats) -> str:
    val = f"  val error {row['val_error']:.2f}%" if "val_error" in row else ""
    test = f"  test error {row['test_error']:.2f}%" if "test_error" in row else ""
    if "val_auroc" in row or "test_auroc" in row:  # binary, multilabel: AUROC, ACC, ... (training/tasks.py)
        val, test = tasks.epoch_summary(row), ""
    return (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f}  "
            f"train error {row['train_error']:.2f}%{val}{test}  "
            f"{row['seconds']:.0f}s ({stats.n / max(stats.seconds, 1e-9):.0f} img/s)")


def _finish(options: TrainOptions, model: torch.nn.Module, data: Data, run_dir: Path, history: list[dict],
            best: dict, metadata: dict, info: distributed.Dist) -> dict[str, Any]:
    from densenet.models.weights import save_weights

    final = history[-1]
    reported = final
    if data.val is not None:  # the paper (SVHN): the test error of the epoch with the lowest validation error
        reported = history[best["epoch"] - 1]
        if info.is_main and best["epoch"] != final["epoch"]:
            model.load_state_dict(load_checkpoint(run_dir / BEST)["model"])
    summary = {"run_dir": str(run_dir), "epoch": reported["epoch"], "test_error": reported["test_error"],
               "test_top5_error": reported["test_top5_error"], "paper_error": options.info.get("paper_error")}
    if info.is_main:
        save_weights(model, run_dir / "model.safetensors", metadata)
        run_folder.write_curves(run_dir, history, f"{options.model} on {options.dataset}")
        which = f" (epoch {reported['epoch']}, lowest validation error)" if data.val is not None else ""
        paper = f"; the paper reports {summary['paper_error']}%" if summary["paper_error"] is not None else ""
        _say(f"test error {reported['test_error']:.2f}%{which}{paper}; weights in {run_dir / 'model.safetensors'}")
    return summary


def _finish_task(options: TrainOptions, model: torch.nn.Module, data: Data, run_dir: Path, history: list[dict],
                 best: dict, metadata: dict, info: distributed.Dist, measure) -> dict[str, Any]:
    """A binary or multilabel run's end: the best validation epoch's weights (every rank loads them: all evaluate),
    the test split evaluated once on them, thresholds chosen on validation into the metadata (training/tasks.py)."""
    from densenet.models.weights import save_weights

    if best.get("metric") and best["epoch"] and best["epoch"] != history[-1]["epoch"]:
        model.load_state_dict(load_checkpoint(run_dir / BEST)["model"])
    summary, extra = tasks.finish(data, run_dir, history, best, model, measure, info.is_main, _say)
    summary["paper_error"] = options.info.get("paper_error")
    if info.is_main:
        save_weights(model, run_dir / "model.safetensors", metadata | extra)
        run_folder.write_curves(run_dir, history, f"{options.model} on {options.dataset}")
        _say(f"weights in {run_dir / 'model.safetensors'}; measures in {run_dir / tasks.RESULTS}")
    return summary


def _say(line: str) -> None:
    print(line, flush=True)

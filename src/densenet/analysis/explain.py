"""Heat maps of where a classifier looked: CAM, exact for the paper's head, and Grad-CAM for any dense block.

    densenet explain runs/pneumonia xray1.png xray2.png --out heatmaps --sheet
    densenet explain runs/miml photos/ --out maps --method gradcam --layer denseblock3 --label sea

**CAM** (Zhou et al. 2016, the maps of CheXNet). The paper's head is final BN-ReLU -> global average pooling
-> linear, so a logit is ``z_k = b_k + mean_xy sum_c w[k, c] A[c, x, y]`` with A the last feature maps. The map
``M_k[x, y] = sum_c w[k, c] A[c, x, y]`` is then not an approximation of the evidence but its exact spatial
decomposition: the mean of M_k plus b_k is the logit. ``class_activation_maps`` checks this identity on every
batch against the model's own ``forward_head`` and refuses a head for which it fails (another pooling, a
hidden layer): there CAM would draw something the network does not compute.

**Grad-CAM** (Selvaraju et al. 2017) for a stage of ``feature_info`` (a dense block's output; the last stage is
the maps after the final BN-ReLU, as in ``features.py``): ``ReLU(sum_c alpha_c A_c)`` with ``alpha_c`` the
spatial mean of d(logit)/dA_c. At the last stage of the paper's head alpha_c = w[k, c] / HW, so Grad-CAM is
ReLU(CAM) up to scale: the tests check it, and check every map against the ``grad-cam`` package
(``pytorch_grad_cam``) as an oracle. The maps are computed here rather than by that package because it hands
back only a map rescaled to [0, 1] at input size, resized by OpenCV in 2D and by a cubic spline in 3D (not
trilinear, and it overshoots), and it captures layers by forward hooks, which see the final BN's output before
DenseNet's in-place ReLU overwrites it; here the raw scores are kept, both methods are upsampled the same way
(bilinear, trilinear in 3D), and the last stage is ``forward_features``' own output.

**What is explained** follows the task (``densenet.data.task``, from the weights' metadata): multiclass models
the predicted class (softmax probability); a one-logit binary model the positive logit (its sigmoid; the
negative class's map is the same map negated, asked for by its name, as the package's
``BinaryClassifierOutputTarget(0)``); multilabel models the most probable label or a named one (its sigmoid).

**Volumes.** A model whose features are (N, C, D, H, W) gets a volume of scores, upsampled trilinearly to the
input, drawn as a grid of slices along the first spatial axis (axial for volumes stored depth first, as
MedMNIST 3D's), all on the volume's one colour scale.

Images come in preprocessed, as the network saw them (``densenet explain`` loads files as ``predict`` does);
the metadata's mean and std undo the normalisation for display.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.data.task import Task
from densenet.errors import ConfigError, DenseNetError

Method = Literal["cam", "gradcam"]
METHODS = ("cam", "gradcam")
_INTERPOLATION = {2: "bilinear", 3: "trilinear"}


def task_from_metadata(metadata: dict[str, Any], num_outputs: int) -> Task:
    """The task recorded in the weights' metadata; for weights saved before tasks were recorded, a one-logit
    model is binary (its ``classes``: negative and positive, or the positive alone) and any other multiclass."""
    if metadata.get("task"):
        task = Task.from_dict(metadata["task"])
    else:
        names = [str(n) for n in metadata.get("classes") or []]
        if num_outputs == 1:
            names = [f"not {names[0]}", names[0]] if len(names) == 1 else names or ["0", "1"]
            task = Task("binary", tuple(names))
        else:
            task = Task.multiclass(names or [str(i) for i in range(num_outputs)])
    if task.num_outputs != num_outputs:
        raise DenseNetError(f"the weights' metadata describes a {task.kind} task with {task.num_outputs} "
                            f"output(s) ({', '.join(task.names)}), but the model has {num_outputs}")
    return task


def predicted(task: Task, probabilities: Tensor, threshold: float = 0.5) -> tuple[str, float]:
    """One image's predicted label and its probability (multilabel: the most probable label). A binary model
    decides at ``threshold``: the run's own (chosen on validation, in the weights' metadata), as predict does."""
    if task.kind == "binary":
        p = float(probabilities[0])
        return (task.names[1], p) if p > threshold else (task.names[0], 1.0 - p)
    i = int(probabilities.argmax())
    return task.names[i], float(probabilities[i])


def choose_target(task: Task, probabilities: Tensor, label: str | None) -> Target:
    """The logit to explain for one image: ``label`` by name, else the predicted label (binary: the positive)."""
    if label is None:
        if task.kind == "binary":
            return Target(0, 1.0, task.names[1], float(probabilities[0]))
        i = int(probabilities.argmax())
        return Target(i, 1.0, task.names[i], float(probabilities[i]))
    if label not in task.names:
        raise DenseNetError(f"label {label!r} is not one of this model's labels: {', '.join(task.names)}")
    if task.kind == "binary":
        p = float(probabilities[0])
        return Target(0, 1.0, label, p) if label == task.names[1] else Target(0, -1.0, label, 1.0 - p)
    i = task.names.index(label)
    return Target(i, 1.0, label, float(probabilities[i]))


@dataclass(frozen=True)
class Target:
    """What to explain: ``sign`` times logit ``index`` (sign -1: the negative class of a one-logit binary model)."""

    index: int
    sign: float
    name: str
    probability: float


@dataclass
class Explanation:
    """One image's heat map, at the input's resolution, with what it explains."""

    name: str  # the image's file (or index)
    pixels: np.ndarray  # (C, *spatial) in [0, 1], for display
    scores: np.ndarray  # (*spatial): the raw map (CAM: logit units; Grad-CAM: >= 0)
    label: str  # the explained label
    probability: float  # its probability
    predicted: str
    predicted_probability: float
    method: str
    layer: str
    true_label: str | None = None

    @property
    def correct(self) -> bool | None:
        """Whether the prediction is the true label, or one of them (multilabel: ``sea|sunset``); unknown: None."""
        return None if self.true_label is None else self.predicted in self.true_label.split("|")


# ---------------------------------------------------------------------------------------------------- the maps


def stage_names(model: nn.Module) -> list[str]:
    """The module names of ``model.feature_info``'s stages (``features.denseblock1``, ..., ``features.norm5``)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ConfigError("this model has no feature_info: its stages cannot be named for Grad-CAM")
    return [stage["module"] for stage in info]


def resolve_layer(model: nn.Module, layer: str | None) -> str:
    """A stage's full module name from its full name, its last part (``denseblock2``, ``norm5``) or its index
    (``0``, ``-1``); None is the last stage. DenseNet's last stage is named after its final BN (``norm5``), and
    is also found by its block's name (``denseblock4`` of DenseNet-121), which its maps are, after BN-ReLU."""
    names = stage_names(model)
    if layer is None:
        return names[-1]
    short = [name.rsplit(".", 1)[-1] for name in names]
    last_block = f"denseblock{len(names)}" if short[-1] == "norm5" else None
    if layer in names or layer in short:
        return names[names.index(layer)] if layer in names else names[short.index(layer)]
    if layer in (last_block, f"features.{last_block}"):
        return names[-1]
    if re.fullmatch(r"-?\d+", layer) and -len(names) <= int(layer) < len(names):
        return names[int(layer)]
    shown = short[:-1] + [f"{last_block} (= {short[-1]})" if last_block else short[-1]]
    raise ConfigError(f"--layer {layer!r}: this model's stages are {', '.join(shown)} "
                      f"(or their index 0..{len(names) - 1})")


def linear_classifier(model: nn.Module) -> nn.Linear:
    """The model's final linear layer, which CAM's weights come from."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError("CAM needs a linear classifier after global average pooling; this model has "
                          f"{type(head).__name__}: use --method gradcam")
    return head


def class_activation_maps(model: nn.Module, images: Tensor, task: Task,
                          label: str | None = None) -> tuple[Tensor, list[Target], Tensor]:
    """CAM at the feature maps' resolution: (maps (N, *feature spatial), targets, probabilities (N, outputs)).

    The identity mean(map) + bias = logit (times the target's sign) is checked against ``forward_head`` on
    this batch; a ConfigError says the head is not global pooling + linear where it fails.
    """
    classifier = linear_classifier(model)
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model.forward_head(features)
        probabilities = task.probabilities(logits).detach()
        targets = [choose_target(task, p, label) for p in probabilities]
        index = torch.tensor([t.index for t in targets], device=features.device)
        sign = torch.tensor([t.sign for t in targets], device=features.device, dtype=features.dtype)
        weights = classifier.weight[index].to(features.dtype) * sign[:, None]
        maps = torch.einsum("nc,nc...->n...", weights, features)
        bias = classifier.bias[index] * sign if classifier.bias is not None else torch.zeros_like(sign)
        reconstructed = maps.flatten(1).mean(1) + bias
        logit = logits.gather(1, index[:, None])[:, 0] * sign
    scale = float(logits.abs().max()) + 1.0
    if not torch.allclose(reconstructed, logit, rtol=1e-3, atol=1e-4 * scale):
        raise ConfigError("CAM is exact only for a global-average-pooling + linear head, and this model's "
                          "forward_head is not one (the map's mean plus the bias is not the logit): "
                          "use --method gradcam")
    return maps, targets, probabilities


def grad_cams(model: nn.Module, images: Tensor, task: Task, layer: str | None = None,
              label: str | None = None) -> tuple[Tensor, list[Target], Tensor]:
    """Grad-CAM at the resolution of stage ``layer`` (default: the last): (maps, targets, probabilities).

    The model must be in eval mode (BN on running statistics), so that each image's logit depends on its own
    maps only and one backward pass gives every image's gradients.
    """
    name = resolve_layer(model, layer)
    module = None if name == stage_names(model)[-1] else model.get_submodule(name)
    captured: list[Tensor] = []
    with torch.enable_grad():
        images = images.detach().requires_grad_(True)  # frozen parameters still give the maps a gradient
        if module is None:  # the last stage: the maps after the final BN-ReLU, which the head pools
            activations = model.forward_features(images)
            logits = model.forward_head(activations)
        else:
            handle = module.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
            try:
                logits = model(images)
            finally:
                handle.remove()
            if len(captured) != 1:
                raise ConfigError(f"stage {name} ran {len(captured)} times in one forward pass; Grad-CAM needs one")
            activations = captured[0]
        probabilities = task.probabilities(logits).detach()
        targets = [choose_target(task, p, label) for p in probabilities]
        index = torch.tensor([t.index for t in targets], device=logits.device)
        sign = torch.tensor([t.sign for t in targets], device=logits.device, dtype=logits.dtype)
        selected = (logits.gather(1, index[:, None])[:, 0] * sign).sum()
        (gradients,) = torch.autograd.grad(selected, activations)
    spatial = tuple(range(2, activations.dim()))
    alpha = gradients.mean(dim=spatial, keepdim=True)
    maps = F.relu((alpha * activations.detach()).sum(dim=1))
    return maps, targets, probabilities


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(N, *spatial) maps resized to ``size``: bilinear in 2D, trilinear in 3D (half-pixel centres)."""
    if maps.dim() - 1 not in _INTERPOLATION:
        raise DenseNetError(f"heat maps are drawn for 2D images and 3D volumes; these maps are {maps.dim() - 1}D")
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode=_INTERPOLATION[maps.dim() - 1],
                         align_corners=False)[:, 0]


def display_pixels(images: Tensor, metadata: dict[str, Any]) -> np.ndarray:
    """The images as the eye should see them: the metadata's normalisation undone, in [0, 1]; without mean and
    std, each image stretched to [0, 1]."""
    images = images.detach().float().cpu()
    channels = images.shape[1]
    view = (1, channels) + (1,) * (images.dim() - 2)
    mean, std = metadata.get("mean"), metadata.get("std")
    if mean and std:
        mean = torch.tensor([float(m) for m in mean]).expand(channels) if len(mean) == 1 else torch.tensor(mean)
        std = torch.tensor([float(s) for s in std]).expand(channels) if len(std) == 1 else torch.tensor(std)
        pixels = images * std.reshape(view) + mean.reshape(view)
    else:
        low = images.flatten(1).min(1).values.reshape(-1, *(1,) * (images.dim() - 1))
        high = images.flatten(1).max(1).values.reshape(-1, *(1,) * (images.dim() - 1))
        pixels = (images - low) / (high - low).clamp_min(1e-12)
    return pixels.clamp(0, 1).numpy()


def explain_batch(model: nn.Module, images: Tensor, metadata: dict[str, Any] | None = None, method: Method = "cam",
                  layer: str | None = None, label: str | None = None, names: Sequence[str] | None = None,
                  true_labels: Sequence[str | None] | None = None) -> list[Explanation]:
    """One Explanation per image of a preprocessed batch (N, C, H, W) or (N, C, D, H, W).

    ``label`` is a label name (default: the predicted one; binary: the positive); ``layer`` a stage for Grad-CAM
    (CAM always reads the last maps). The model is put in eval mode.
    """
    metadata = metadata or {}
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if images.dim() - 2 not in _INTERPOLATION:
        raise DenseNetError(f"images must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(images.shape)}")
    if method == "cam" and layer is not None and resolve_layer(model, layer) != stage_names(model)[-1]:
        raise ConfigError(f"CAM reads the last feature maps only (--layer {layer!r} is not the last stage): "
                          f"use --method gradcam for another block")
    model.eval()
    device = next(model.parameters()).device
    images = images.to(device, next(model.parameters()).dtype)
    num_outputs = int(linear_classifier(model).out_features) if method == "cam" else _num_outputs(model, images)
    task = task_from_metadata(metadata, num_outputs)
    if method == "cam":
        maps, targets, probabilities = class_activation_maps(model, images, task, label)
        layer_name = stage_names(model)[-1] if getattr(model, "feature_info", None) else "forward_features"
    else:
        maps, targets, probabilities = grad_cams(model, images, task, layer, label)
        layer_name = resolve_layer(model, layer)
    scores = upsample(maps, images.shape[2:]).cpu().numpy()
    pixels = display_pixels(images, metadata)
    names = list(names) if names is not None else [str(i) for i in range(len(images))]
    truths = list(true_labels) if true_labels is not None else [None] * len(images)
    if len(names) != len(images) or len(truths) != len(images):
        raise ValueError(f"{len(images)} images, {len(names)} names, {len(truths)} true labels")
    threshold = float(metadata["thresholds"][0]) if task.kind == "binary" and metadata.get("thresholds") else 0.5
    out = []
    for i, target in enumerate(targets):
        guess, p = predicted(task, probabilities[i], threshold)
        out.append(Explanation(names[i], pixels[i], scores[i], target.name, target.probability, guess, p,
                               method, layer_name, truths[i]))
    return out


def _num_outputs(model: nn.Module, images: Tensor) -> int:
    head = getattr(model, "get_classifier", lambda: getattr(model, "classifier", None))()
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    with torch.no_grad():
        return int(model(images[:1]).shape[1])


# ---------------------------------------------------------------------------------------------------- drawing


def slice_indices(depth: int, max_slices: int = 16) -> list[int]:
    """The slices of a volume to draw: all of them up to ``max_slices``, else that many evenly spaced."""
    if depth <= max_slices:
        return list(range(depth))
    return sorted({round(i * (depth - 1) / (max_slices - 1)) for i in range(max_slices)})


def _normalised(scores: np.ndarray) -> np.ndarray:
    low, high = float(scores.min()), float(scores.max())
    return (scores - low) / (high - low) if high > low else np.zeros_like(scores)


def _draw(ax: Any, pixels: np.ndarray, heat: np.ndarray, alpha: float) -> None:
    """An image (C, H, W) in gray or colour, the map (H, W, in [0, 1]) over it in a semi-transparent colormap."""
    image = pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels[:3], 0, -1)
    ax.imshow(image, cmap="gray" if pixels.shape[0] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.imshow(heat, cmap="jet", vmin=0, vmax=1, alpha=alpha, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _title(e: Explanation) -> str:
    how = "CAM" if e.method == "cam" else f"Grad-CAM, {e.layer.rsplit('.', 1)[-1]}"
    other = "" if e.label == e.predicted else f"; predicted {e.predicted} {e.predicted_probability:.3f}"
    return f"{e.label}  p={e.probability:.3f}  ({how}){other}"


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def render_overlay(e: Explanation, alpha: float = 0.45, max_slices: int = 16) -> bytes:
    """One image's overlay as PNG bytes; a volume as a grid of slices on the volume's one colour scale."""
    from matplotlib.figure import Figure

    heat = _normalised(e.scores)
    if e.scores.ndim == 2:
        fig = Figure(figsize=(4.2, 4.6), layout="constrained")
        ax = fig.add_subplot()
        _draw(ax, e.pixels, heat, alpha)
        ax.set_title(_title(e), fontsize=9)
        ax.set_xlabel(Path(e.name).name, fontsize=7)
    else:
        slices = slice_indices(e.scores.shape[0], max_slices)
        columns = math.ceil(math.sqrt(len(slices)))
        rows = math.ceil(len(slices) / columns)
        fig = Figure(figsize=(1.8 * columns, 1.8 * rows + 0.6), layout="constrained")
        for k, z in enumerate(slices):
            ax = fig.add_subplot(rows, columns, k + 1)
            _draw(ax, e.pixels[:, z], heat[z], alpha)
            ax.set_title(f"slice {z}", fontsize=7)
        fig.suptitle(f"{Path(e.name).name}: {_title(e)}", fontsize=9)
    return _png(fig)


def render_sheet(explanations: Sequence[Explanation], columns: int | None = None, alpha: float = 0.45) -> bytes:
    """A contact sheet as PNG bytes: one tile per image, titled with its true label (if known), the prediction
    and its probability, marked correct (green) or wrong (red). A volume shows its slice of highest score."""
    from matplotlib.figure import Figure

    if not explanations:
        raise DenseNetError("no images to draw a contact sheet of")
    columns = columns or min(len(explanations), max(1, math.ceil(math.sqrt(len(explanations)))))
    rows = math.ceil(len(explanations) / columns)
    fig = Figure(figsize=(2.4 * columns, 2.9 * rows), layout="constrained")
    for k, e in enumerate(explanations):
        ax = fig.add_subplot(rows, columns, k + 1)
        heat = _normalised(e.scores)
        if heat.ndim == 3:
            z = int(np.unravel_index(int(heat.argmax()), heat.shape)[0])
            _draw(ax, e.pixels[:, z], heat[z], alpha)
        else:
            _draw(ax, e.pixels, heat, alpha)
        lines = [Path(e.name).name]
        if e.true_label is not None:
            lines.append(f"true: {e.true_label}")
        lines.append(f"pred: {e.predicted} {e.predicted_probability:.2f}"
                     + ("" if e.correct is None else ("  correct" if e.correct else "  WRONG")))
        if e.label != e.predicted:
            lines.append(f"map: {e.label} {e.probability:.2f}")
        colour = "black" if e.correct is None else ("tab:green" if e.correct else "tab:red")
        ax.set_title("\n".join(lines), fontsize=7, color=colour)
        if e.correct is not None:
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5)
    method = "CAM" if explanations[0].method == "cam" else f"Grad-CAM at {explanations[0].layer}"
    fig.suptitle(method, fontsize=9)
    return _png(fig)


def _writing(out_dir: Path, path: Path, png: bytes) -> Path:
    from densenet.files import atomic_write

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(png))
    except OSError as exc:
        raise DenseNetError(f"cannot write to {out_dir}: {exc.strerror or exc}") from exc
    return path


def write_overlays(explanations: Sequence[Explanation], out_dir: str | Path, max_slices: int = 16,
                   taken: set[str] | None = None) -> list[Path]:
    """OUT_DIR/NAME.METHOD.png per image, written atomically; NAME is the file's stem, made unique among
    ``taken`` (updated, so that batches written one after another keep apart). The paths, in order."""
    out_dir = Path(out_dir)
    taken = set() if taken is None else taken
    written = []
    for e in explanations:
        stem = re.sub(r"[^\w.-]+", "_", Path(e.name).stem) or "image"
        unique, n = stem, 1
        while unique in taken:
            n += 1
            unique = f"{stem}-{n}"
        taken.add(unique)
        png = render_overlay(e, max_slices=max_slices)
        written.append(_writing(out_dir, out_dir / f"{unique}.{e.method}.png", png))
    return written


def write_sheet(explanations: Sequence[Explanation], out_dir: str | Path) -> Path:
    """OUT_DIR/sheet.METHOD.png, the contact sheet of ``explanations``, written atomically."""
    out_dir = Path(out_dir)
    return _writing(out_dir, out_dir / f"sheet.{explanations[0].method}.png", render_sheet(explanations))


def explain(model: nn.Module, images: Tensor | Iterable[Tensor], out_dir: str | Path,
            metadata: dict[str, Any] | None = None, method: Method = "cam", layer: str | None = None,
            label: str | None = None, names: Sequence[str] | None = None,
            true_labels: Sequence[str | None] | None = None, sheet: bool = False, batch_size: int = 32) -> list[Path]:
    """Heat maps of preprocessed images written to ``out_dir``: one overlay per image, written a batch at a time,
    and a contact sheet of them all when ``sheet``. The paths written, in order.

    ``images`` is one tensor (N, C, H, W) or (N, C, D, H, W), taken ``batch_size`` at a time, or an iterable of
    such batches (files decoded lazily by the caller); ``names`` and ``true_labels`` follow the images' order.
    """
    if batch_size < 1:
        raise DenseNetError(f"batch size must be at least 1, got {batch_size}")
    if isinstance(images, Tensor):
        images = images.split(batch_size)
    written: list[Path] = []
    taken: set[str] = set()
    kept: list[Explanation] = []  # only for the sheet: the overlays need one batch at a time
    seen = 0
    for batch in images:
        stop = seen + len(batch)
        found = explain_batch(model, batch, metadata, method, layer, label,
                              names[seen:stop] if names is not None else [str(i) for i in range(seen, stop)],
                              true_labels[seen:stop] if true_labels is not None else None)
        written += write_overlays(found, out_dir, taken=taken)
        kept += found if sheet else []
        seen = stop
    if sheet and kept:
        written.append(write_sheet(kept, out_dir))
    return written

"""Image-folder trees (``train/<class>/*``, ``test/<class>/*``): listed, decoded once, or streamed.

Small images (the CIFAR-10 JPEG tree) are decoded once into a uint8 array and cached next to the data
(or under ~/.cache/densenet when that folder is read-only); the cache is keyed by the files' names,
sizes and times, so adding or replacing an image rebuilds it. Large images (ImageNet, a user's photos)
stream through DataLoader workers with the fb.resnet.torch transforms the paper used.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms

from densenet.data.images import IMAGE_EXTENSIONS, load_image
from densenet.errors import DenseNetError

# fb.resnet.torch's PCA lighting noise: eigenvalues and eigenvectors of the ImageNet RGB covariance.
_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def scan(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, label)]) of a class-folder tree; ``classes`` fixes the label order (a test split)."""
    if not root.is_dir():
        raise DenseNetError(f"{root} does not exist; expected class folders {root}/<class>/<image files>")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DenseNetError(f"{root} holds no class folders; expected {root}/<class>/<image files>")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DenseNetError(f"{root} has class folders the training set lacks: {', '.join(unknown[:5])}")
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
        if not files and name in found:
            raise DenseNetError(f"class folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
        samples += [(path, label) for path in files]
    return classes, samples


def decode_all(root: Path, samples: list[tuple[Path, int]], size: int, mode: str = "RGB",
               cache_name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """All images as one uint8 array (N, C, size, size) and their labels, from the cache when it is current."""
    key = _fingerprint(samples, size, mode)
    cache = _cache_path(root, cache_name or root.name)
    if cache.is_file():
        try:
            with np.load(cache) as saved:
                if str(saved["key"]) == key:
                    return saved["images"], saved["labels"]
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a damaged cache is rebuilt
    channels = 1 if mode == "L" else 3
    images = np.empty((len(samples), channels, size, size), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        img = load_image(path, mode=mode)
        if img.size != (size, size):
            img = img.resize((size, size), resample=3)  # bicubic
        array = np.asarray(img, dtype=np.uint8)
        images[i] = array[None] if channels == 1 else array.transpose(2, 0, 1)
    labels = np.array([label for _, label in samples], dtype=np.int64)
    _write_cache(cache, key, images, labels)
    return images, labels


def _fingerprint(samples: list[tuple[Path, int]], size: int, mode: str) -> str:
    digest = hashlib.sha256(f"{size}:{mode}".encode())
    for path, label in samples:
        st = path.stat()
        digest.update(f"{path.parent.name}/{path.name}:{label}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_path(root: Path, name: str) -> Path:
    if os.access(root.parent, os.W_OK):
        return root.parent / f".densenet-cache-{name}.npz"
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "densenet" / f"{tag}-{name}.npz"


def _write_cache(cache: Path, key: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Best effort: a cache that cannot be written only costs the decode next time."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(key), images=images, labels=labels)
        tmp = cache.with_name(f".tmp-{os.getpid()}-{cache.name}")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, cache)
    except OSError:
        pass


class ImageFiles(torch.utils.data.Dataset):
    """Images streamed from files through a torchvision transform; a broken file's error names it."""

    def __init__(self, classes: list[str], samples: list[tuple[Path, int]], transform) -> None:
        self.classes, self.samples, self.transform = classes, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_image(path)
        except DenseNetError as exc:  # met mid-epoch: say how to find every other broken file in one pass
            raise DenseNetError(f"{exc} (list every broken file at once: densenet check-data "
                                f"{path.parent.parent})") from exc
        return self.transform(image), label


class Lighting:
    """AlexNet-style PCA colour noise on a 0..1 tensor image (fb.resnet.torch, alphastd 0.1)."""

    def __init__(self, alphastd: float = 0.1) -> None:
        self.alphastd = alphastd

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.alphastd
        rgb = _EIGVEC @ (alpha * _EIGVAL)
        return img + rgb.view(3, 1, 1)


def train_transform(size: int, augment: str, mean: list[float], std: list[float]):
    """fb.resnet.torch: random-resized crop, flip, colour jitter, PCA lighting ("standard"); else the eval crop."""
    if augment == "none":
        return eval_transform(size, mean, std)
    return transforms.Compose([
        transforms.RandomResizedCrop(size),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        transforms.ToTensor(),
        Lighting(0.1),
        transforms.Normalize(mean, std),
    ])


def eval_transform(size: int, mean: list[float], std: list[float], ten_crop: bool = False):
    """Resize the short side to size * 8/7 (256 for 224), then the centre crop or the ten crops."""
    resize = round(size * 256 / 224)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    if ten_crop:
        return transforms.Compose([transforms.Resize(resize), transforms.TenCrop(size), _StackCrops(to_tensor)])
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), to_tensor])


class _StackCrops:
    """The ten PIL crops as one (10, C, H, W) tensor (a class, not a lambda, so workers can pickle it)."""

    def __init__(self, to_tensor) -> None:
        self.to_tensor = to_tensor

    def __call__(self, crops) -> torch.Tensor:
        return torch.stack([self.to_tensor(crop) for crop in crops])

"""What several test modules share: tiny data on disk, the CLI in-process, user errors, forged files.

Each helper lives here once; a test module imports it (``from tests.helpers import make_image_folder``).
Data sets in their official on-disk formats are in tests/data/formats.py.
"""

from __future__ import annotations

import hashlib
import io
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.models import DenseNet121_Weights, Weights, WeightsEnum
from torchvision.transforms._presets import ImageClassification

import densenet
from densenet import cli
from densenet.models import pretrained
from densenet.models.registry import MODELS, imagenet_config

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "densenet_bc16_k4"
TINY = dict(growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8)  # a tiny ImageNet-form network


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 4, size: int = 8, seed: int = 0) -> Path:
    """root/{train,test}/<class>/<n>.png: small random images, each class a different mean colour."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 128, (size, size, 3)) + 100 * c
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``densenet ARGV`` in this process: (exit code, stdout, stderr). An uncaught exception fails the test."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, command: str, *needles: str) -> str:
    """Non-zero exit, exactly one ``densenet COMMAND: error: ...`` line on stderr naming each needle, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"densenet {command}: error: ")]
    assert code != 0, f"exit code 0 for a user error; stderr: {err!r}"
    assert "Traceback" not in err, err
    assert len(errors) == 1, f"expected one error line on stderr, got: {err!r}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def subprocess_env(**extra: str) -> dict[str, str]:
    """One thread, so a run is bitwise repeatable and does not fight the other tests for the two cores."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


class _RunsCommand:
    """Unpickling this would run a shell command that creates a file: a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path, marker):
    """A checkpoint in torch.save's own format whose unpickling would run ``touch marker``."""
    torch.save({"model": {}, "epoch": 3, "payload": _RunsCommand(marker)}, path)
    assert not marker.exists()


def _jpeg(size=32):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


BROKEN_IMAGES = [
    ("cut.jpg", _jpeg()[:300], "truncated JPEG"),
    ("text.png", b"not an image, only text\n", "not an image file"),
    ("empty.png", b"", "empty file (0 bytes)"),
]


def cache_tiny_weights(monkeypatch, torch_home, corrupt: bool = False, state=None) -> dict[str, torch.Tensor]:
    """Save a tiny densenet121-like state dict (or ``state``, then for the real architecture) under the name its
    weights entry expects; return the state."""
    real_size = state is not None
    state = densenet.create_model("densenet121", **TINY).state_dict() if state is None else state
    buffer = io.BytesIO()
    # The published 2017 files predate torch's zip format: save those as they are (pickle, weights-only readable).
    torch.save(state, buffer, _use_new_zipfile_serialization=not real_size)
    blob = buffer.getvalue()
    if not real_size:
        monkeypatch.setitem(MODELS, "densenet121", {**imagenet_config(**TINY)})
    place_weights_file(monkeypatch, torch_home, blob, stored=blob[:-1] + bytes([blob[-1] ^ 1]) if corrupt else blob)
    return state


def place_weights_file(monkeypatch, torch_home, blob: bytes, stored: bytes | None = None) -> Path:
    """A torchvision weights entry for densenet121 whose URL names ``blob``'s SHA-256 prefix, and ``stored``
    (default: the blob itself) in the cache under that name, as torch.hub would have downloaded it."""
    prefix = hashlib.sha256(blob).hexdigest()[:8]

    class CachedWeights(WeightsEnum):
        IMAGENET1K_V1 = Weights(url=f"https://download.example.org/models/densenet121-{prefix}.pth",
                                transforms=partial(ImageClassification, crop_size=224),
                                meta=dict(DenseNet121_Weights.IMAGENET1K_V1.meta))
        DEFAULT = IMAGENET1K_V1

    monkeypatch.setattr(pretrained, "torchvision_weights", lambda name: CachedWeights.DEFAULT)
    path = torch_home / "hub" / "checkpoints" / f"densenet121-{prefix}.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(blob if stored is None else stored)
    return path


_PEAK_SCRIPT = """
import sys, torch, torch.nn.functional as F
from densenet.models.densenet import DenseNet
torch.set_num_threads(1)

def rss(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) * 1024

torch.manual_seed(0)
model = DenseNet(growth_rate=12, block_config=(int(sys.argv[1]),), stem="cifar", num_classes=5, block_impl=sys.argv[2])
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
base = rss("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
for _ in range(2):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
print(rss("VmHWM") - base)
"""


def training_peak_rss(tmp_path: Path, layers: int, block_impls: tuple[str, ...]) -> dict[str, int]:
    """Peak RSS (bytes) over two SGD steps of a one-block CIFAR-stem DenseNet (growth 12, ``layers`` layers,
    8 images of 32x32, one thread) above the RSS after building it, per block implementation: a fresh process
    each, glibc's default allocator (no MALLOC_* variables), as a user's training gets it."""
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    used = {}
    for impl in block_impls:
        out = subprocess.run([sys.executable, str(script), str(layers), impl], capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        used[impl] = int(out.stdout.split()[-1])
    return used


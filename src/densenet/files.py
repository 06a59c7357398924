"""Files written atomically and read without running code: what every layer that saves or loads shares.

``atomic_write`` writes a temporary file in the same folder, flushes and fsyncs it, then renames it over
the old one, so a crash at any moment leaves either the old or the new file, never a torn one.
``safe_load`` unpickles with ``weights_only=True``: a file from a stranger cannot run code, it is refused
with a message. Training checkpoints, weight files, reports and caches all go through these two.
"""

from __future__ import annotations

import errno
import fnmatch
import io
import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from densenet.errors import DenseNetError

_TMP_PREFIX = ".tmp-"


_ADVICE = {errno.ENOSPC: "free space on that disk, or write elsewhere (another --out)",
           errno.EDQUOT: "free space within your disk quota, or write elsewhere (another --out)",
           errno.EACCES: "make the folder writable for this user, or write elsewhere (another --out)",
           errno.EPERM: "make the folder writable for this user, or write elsewhere (another --out)",
           errno.EROFS: "the file system is read-only: write elsewhere (another --out)"}


def with_advice(exc: OSError, path: str | os.PathLike, tmp: Path | None = None) -> OSError:
    """The same error (OSError picks the subclass from errno), naming the file the user asked for (not our
    temporary) and saying what to do (free space, another --out) where that is known."""
    strerror = exc.strerror or str(exc)
    if exc.errno in _ADVICE and _ADVICE[exc.errno] not in strerror:
        strerror = f"{strerror} ({_ADVICE[exc.errno]})"
    filename = exc.filename if exc.filename not in (None, str(tmp)) else str(path)
    return OSError(exc.errno, strerror, filename)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-PID-*`` files that writers killed mid-write left in ``folder``; the paths removed.

    A file is stale when its PID is no live process on this machine (ours is never touched); a live PID,
    even one reused by another program, keeps its file: only a sure leftover is deleted.
    """
    removed = []
    try:
        candidates = list(Path(folder).glob(f"{_TMP_PREFIX}*-*"))
    except OSError:
        return removed
    for tmp in candidates:
        pid = tmp.name[len(_TMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass  # read-only or already gone: the write that follows says what is wrong, if anything
    return removed


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` and rename it into place once it is on disk.

    Temporaries that killed writers left in the folder are deleted first (``sweep_temporaries``). An OSError
    names the file and, for a full disk or a refused write, says what to do.
    """
    path = Path(path)
    sweep_temporaries(path.parent)
    tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise with_advice(exc, path, tmp) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load`` with weights-only unpickling: tensors and plain values, never code; DenseNetError otherwise.

    A refusal says which of three things the file is: a pickle naming objects that could run code when loaded
    ("refusing to load"), a TorchScript archive (loaded by ``torch.jit.load``, not as weights), or no weights file
    at all (text, ONNX, a truncated copy). PyTorch's own warnings about the file's format (pickle protocol,
    TorchScript dispatch) say nothing a user can act on here and are silenced.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise DenseNetError(f"{what} {printable(path)} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load reports a foreign file with any exception type
        raise _refusal(path, what, exc) from exc


# What a PyTorch weights file's pickle names: tensors and their storages, ordered dicts. Anything else (os.system,
# builtins.eval, a class) is what weights-only unpickling refuses because loading it could run code.
_SAFE_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset",
                 "builtins.bytearray", "builtins.slice", "builtins.complex")
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _refusal(path: Path, what: str, exc: BaseException) -> DenseNetError:
    """Why ``torch.load(weights_only=True)`` rejected ``path``, in one line that tells an unsafe pickle from a file
    that simply is not weights (the weights-only unpickler calls both an UnpicklingError)."""
    name = printable(path)
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    kind = _file_kind(path)
    if kind == "torchscript" or "TorchScript" in detail:
        return DenseNetError(f"{name} is a TorchScript archive (torch.jit.save; densenet export --format torchscript "
                             f"writes these), not a {what}: run it with torch.jit.load, or give the .safetensors "
                             f"weights or run folder it was exported from")
    if kind == "pickle-with-objects" and isinstance(exc, pickle.UnpicklingError):
        return DenseNetError(f"refusing to load {name}: it holds objects other than tensors and plain values, "
                             f"and loading it could run code (weights-only unpickling rejected it)")
    if kind == "pickle" and "Unsupported operand" in str(exc):
        return DenseNetError(f"{name} is a pickle that weights-only loading cannot read (written with a pickle "
                             f"protocol above 2?); save it again with torch.save(model.state_dict(), PATH), the "
                             f"default protocol")
    if kind in ("pickle", "pickle-with-objects", "torch-zip"):  # a PyTorch file, damaged
        return DenseNetError(f"{name} is not a readable {what} (truncated or corrupt?): {detail}")
    return DenseNetError(f"{name} is not a {what} we can read: {kind} (densenet reads .safetensors files, PyTorch "
                         f".pt/.pth state dicts and its own checkpoints)")


def _file_kind(path: Path) -> str:
    """What a file that torch.load refused holds: torchscript, torch-zip, pickle-with-objects, pickle, or words
    describing something else (text, ONNX, empty)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not head:
        return "an empty file (0 bytes)"
    if not zipfile.is_zipfile(path) and head.startswith(b"PK\x03\x04"):
        return "torch-zip"  # a zip cut short (its directory is at the end): a damaged copy
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
                    return "torchscript"
                data = [n for n in names if n.endswith("data.pkl")]
                if not data:
                    return "a zip archive without a PyTorch pickle in it"
                return _pickle_kind(io.BytesIO(archive.read(data[0]))) or "torch-zip"
        except (zipfile.BadZipFile, OSError, KeyError, RuntimeError):
            return "torch-zip"
    with open(path, "rb") as f:
        kind = _pickle_kind(f)
    if kind:
        return kind
    if b"onnx" in head[:256].lower() or head[:1] == b"\x08" and b"pytorch" in head[:64]:
        return "an ONNX model, it seems (run it with onnxruntime, or give the weights it was exported from)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end of what was read
            return "binary data in no format PyTorch writes"
    return "a text file"


def _pickle_kind(stream) -> str | None:
    """``pickle-with-objects`` when the stream holds whole pickles naming objects other than a weights file's
    (``_SAFE_GLOBALS``: a class, a function, what can run code), ``pickle`` when they name none, None when it does
    not start with a pickle.

    Opcodes are only read (``pickletools.genops``), never executed; the names of protocol-4 globals are followed
    through the pickle's memo. A legacy (non-zip) torch file is several pickles in a row: each is read until one
    fails to parse.
    """
    seen_pickle, names = False, []
    for _ in range(8):  # the legacy format has 4 pickles before its raw storage bytes
        memo: dict[int, Any] = {}
        recent: list[Any] = []  # the values last pushed: STACK_GLOBAL takes the module and name from them
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name in _STRINGS:
                    recent.append(arg)
                elif opcode.name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = recent[-1] if recent else None
                elif opcode.name in ("BINGET", "LONG_BINGET", "GET"):
                    recent.append(memo.get(int(arg)))
                elif opcode.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    names.append(".".join(map(str, recent[-2:])) if len(recent) >= 2 else "?")
                elif opcode.name in ("REDUCE", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD") and not names:
                    names.append("?")  # calls on an object from nowhere this reader follows
                recent = recent[-2:]
        except Exception:  # noqa: BLE001 - not (or no longer) a pickle: stop reading
            break
        seen_pickle = True
    if not seen_pickle:
        return None
    unsafe = [n for n in names if not n.startswith(_SAFE_GLOBALS)]
    return "pickle-with-objects" if unsafe else "pickle"


def printable(name: str | os.PathLike | bytes) -> str:
    """A file name as text that can always be printed: bytes that are not UTF-8 (a name made on another system)
    appear as ``\\xNN`` escapes instead of raising UnicodeEncodeError when printed."""
    raw = os.fsencode(name)
    return raw.decode("utf-8", errors="backslashreplace")


# -- outputs: never over an input, never over a run folder's files -------------------------------------------------

# The files ``densenet train`` writes in a run folder (and its lock, temporaries and TensorBoard events).
RUN_FILES = ("config.yaml", "model.safetensors", "checkpoint_*.pt", "metrics.csv",
             "curves.png", ".lock", ".owner", "events.out.tfevents.*", f"{_TMP_PREFIX}*")
_RUN_MARKERS = ("config.yaml", "model.safetensors", "checkpoint_*.pt")


def is_run_folder(folder: str | os.PathLike) -> bool:
    """A folder ``densenet train`` wrote: it holds config.yaml, model.safetensors or a checkpoint_*.pt."""
    folder = Path(folder)
    try:
        return folder.is_dir() and any(any(folder.glob(pattern)) for pattern in _RUN_MARKERS)
    except OSError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they lead
        return a.resolve() == b.resolve()


def check_outputs(outputs: Sequence[tuple[str, str | os.PathLike]], inputs: Iterable[str | os.PathLike] = (),
                  own: Iterable[str] = (), command: str = "this command") -> list[Path]:
    """The output files, once each is known not to destroy something; else DenseNetError (one line) at once.

    ``outputs`` are (flag, file) pairs, e.g. ``[("--out", "model.onnx")]``; ``inputs`` the files (or folders) the
    command reads; ``own`` file-name patterns the command itself writes (``"*.onnx"``, ``"report.md"``). Refused:
    an output that is one of the inputs (the same file after symlinks are followed), two outputs that are one
    file, and, in a run folder (``is_run_folder``), a file of the run (``RUN_FILES``) or an existing file whose
    name is not one of ``own``. Call it before computing anything: a refusal then costs nothing.
    """
    checked: list[tuple[str, Path]] = []
    inputs = [Path(p) for p in inputs]
    own = list(own)
    for flag, out in outputs:
        out = Path(out)
        name = printable(out)
        for given in inputs:
            if _same_file(out, given):
                raise DenseNetError(f"{flag} {name} is a file {command} reads ({printable(given)}): writing it "
                                    f"would destroy it; choose another {flag}")
        for flag_before, before in checked:
            if _same_file(out, before):
                raise DenseNetError(f"{flag} {name} is the same file as {flag_before}; give each its own file")
        folder = out.parent if str(out.parent) else Path(".")
        if is_run_folder(folder):
            if any(fnmatch.fnmatch(out.name, pattern) for pattern in RUN_FILES):
                raise DenseNetError(f"{flag} {name} would overwrite {out.name}, a file of the training run in "
                                    f"{printable(folder)}; choose another name or folder")
            if (out.exists() or out.is_symlink()) and not any(fnmatch.fnmatch(out.name, p) for p in own):
                raise DenseNetError(f"{flag} {name} exists in the run folder {printable(folder)} and was not "
                                    f"written by {command}; choose another name or folder")
        checked.append((flag, out))
    return [path for _, path in checked]


def figure_png(fig: Any, dpi: float | None = None) -> bytes:
    """A matplotlib figure as PNG bytes (``dpi`` None: matplotlib's default), the figure closed: what every
    plot of the package writes, through ``atomic_write``, so that a reader never finds half a picture."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


"""Checkpoints: written atomically, loaded without executing code (``weights_only``)."""
from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rnnkit.config.tasks import task_names
from rnnkit.version import __version__

if TYPE_CHECKING:
    import torch

FORMAT_NAME, FORMAT_VERSION = "rnnkit-checkpoint", 1
FORMAT = f"{FORMAT_NAME}-{FORMAT_VERSION}"


class CheckpointError(ValueError):
    """An unreadable or foreign checkpoint; shown as one line, exit code 2."""


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place: a
    crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        import torch     # here, not at the top: the CLI and data workers start without torch

        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):   # a full disk, a read-only or vanished directory
            kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
            raise CheckpointError(f"cannot write {path}: {err.strerror or err}{kept}") from None
        raise


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:

    atomic_save({"format": FORMAT, "rnnkit_version": __version__, **payload}, path)


def check_format(path: Path, found: Any, name: str, version: int, kind: str) -> None:
    """``found`` (a checkpoint's or an export manifest's contents) must say it is format
    ``name-version``; otherwise one line naming what it is and which rnnkit wrote it."""
    fmt = found.get("format") if isinstance(found, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith(name + "-"):
        raise CheckpointError(f"{path}: not an rnnkit {kind} (expected format {name}-{version})")
    if fmt != f"{name}-{version}":
        raise CheckpointError(f"{path}: {kind} format version {fmt[len(name) + 1:]!r}, written by rnnkit "
                              f"{found.get('rnnkit_version', '?')}; this rnnkit ({__version__}) reads version "
                              f"{version}")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's contents, checked. ``mmap``: tensors are read from the file only when
    used (inference reads the model's and never the optimizer's, two thirds of an Adam run's file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        import torch

        with warnings.catch_warnings():   # torch's remarks on foreign pickles: the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # a truncated file, not a torch file, or unsafe content
        raise CheckpointError(f"{path}: not a readable rnnkit checkpoint ({_unreadable(path, err)})") from None
    check_format(path, ckpt, FORMAT_NAME, FORMAT_VERSION, "checkpoint")
    missing = [k for k in ("config", "model", "task") if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{path}: an incomplete rnnkit checkpoint (no {missing[0] if missing else 'config'})")
    task = ckpt["config"].get("task")
    if task not in task_names():
        raise CheckpointError(f"{path}: a checkpoint of task {task!r}, which this rnnkit ({__version__}) does not "
                              f"know (it knows {', '.join(task_names())})")
    return ckpt


def _unreadable(path: Path, err: Exception) -> str:
    """Why torch could not read ``path``, in rnnkit's words (torch's own text is about its API)."""
    if not zipfile.is_zipfile(path):
        return "not a PyTorch checkpoint file, or a truncated one"
    if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
        return "it holds Python objects besides tensors and plain data; rnnkit loads checkpoints without running code"
    return "a damaged PyTorch file"

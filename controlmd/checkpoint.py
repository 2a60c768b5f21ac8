"""Training checkpoints, and torch files written atomically.

A checkpoint holds everything an exact resume needs: protocol and optimizer state, LR
schedule, counters and the global RNG states; it says so in ``"resume": "exact"`` and
carries its format version (``"format": "controlmd.checkpoint/1"``; a version this code
does not read is refused by name).

:func:`save_checkpoint` keeps one back-up: the new checkpoint is written beside the old
one, the old one becomes ``<name>.prev<suffix>`` and the new one takes its place (each
step an atomic rename). :func:`load_checkpoint` falls back to the back-up, with a warning,
when the latest file is missing, truncated or corrupted.

The torch-free atomic writers live in :mod:`controlmd.files` (re-exported here).
"""

from __future__ import annotations

import io
import os
import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controlmd.errors import ControlMDError
from controlmd.files import atomic_write_bytes, atomic_write_json, atomic_write_text, json_safe

__all__ = [
    "CHECKPOINT_FORMAT",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "backup_path",
    "json_safe",
    "load_checkpoint",
    "load_torch_file",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

_FORMAT_NAME = "controlmd.checkpoint"
_FORMAT_VERSIONS = (1,)
"""Checkpoint format versions this code reads (and, the last one, writes)."""
CHECKPOINT_FORMAT = f"{_FORMAT_NAME}/{_FORMAT_VERSIONS[-1]}"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` written atomically (see :func:`controlmd.files.atomic_write_bytes`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_torch_file(path: str | Path, what: str = "file") -> Any:
    """``torch.load`` of a file this package wrote (CPU tensors).

    :raises ControlMDError: missing, a folder, or unreadable (truncated, corrupted, not a
        torch file), in one line naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ControlMDError(f"{what} {str(path)!r} is a folder, not a file")
    if not path.exists():
        raise ControlMDError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ControlMDError(
            f"{what} {str(path)!r} is unreadable (truncated or corrupted?): {first}"
        ) from None


def rng_state() -> dict[str, Any]:
    """States of the global generators (torch, numpy, random)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def backup_path(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the previous checkpoint: ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a training checkpoint (``payload`` plus format and global RNG state), keeping
    the previous one as :func:`backup_path`.

    :raises ControlMDError: the folder cannot be written; the previous checkpoint is intact.
    """
    path = Path(path)
    blob = {"format": CHECKPOINT_FORMAT, "resume": "exact", "rng": rng_state(), **payload}
    new = path.with_name(f".{path.name}.new")
    atomic_torch_save(blob, new)
    try:
        if path.exists():
            os.replace(path, backup_path(path))
        os.replace(new, path)
    except OSError as exc:
        raise ControlMDError(f"cannot write {path}: {exc.strerror or exc}") from None


def load_checkpoint(path: str | Path, *, fallback: bool = True) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (does not restore RNG state).

    :param fallback: when ``path`` is missing or unreadable, read the back-up
        (:func:`backup_path`) instead, with a warning.
    :raises ControlMDError: no readable checkpoint, or a format version this code does not
        read (named).
    """
    path = Path(path)
    try:
        return _read_checkpoint(path)
    except ControlMDError as exc:
        backup = backup_path(path)
        if not fallback or not backup.exists():
            raise
        blob = _read_checkpoint(backup)
        warnings.warn(
            f"{exc}; resuming from the previous checkpoint {backup.name} "
            f"(iteration {blob.get('trainer', {}).get('iteration', '?')})",
            RuntimeWarning,
            stacklevel=2,
        )
        return blob


def _read_checkpoint(path: Path) -> dict[str, Any]:
    blob = load_torch_file(path, "checkpoint")
    fmt = blob.get("format") if isinstance(blob, dict) else None
    name, _, version = str(fmt).partition("/")
    if name != _FORMAT_NAME:
        raise ControlMDError(f"{path} is not a controlmd checkpoint (format {CHECKPOINT_FORMAT})")
    if not version.isdigit() or int(version) not in _FORMAT_VERSIONS:
        readable = ", ".join(f"{_FORMAT_NAME}/{v}" for v in _FORMAT_VERSIONS)
        raise ControlMDError(
            f"{path} has checkpoint format {fmt!r}, which this controlmd does not read "
            f"(it reads {readable}); resume it with the controlmd version that wrote it"
        )
    return blob  # type: ignore[no-any-return]

"""Durable files, without torch: atomic writes, reads that fail with one clear line.

Atomic writes go to a temporary file in the same folder, are fsynced, then ``os.replace``d
over the target: a reader sees the old file or the complete new one, never a half-written
one. A full disk or a read-only folder raises :class:`~controlmd.errors.ControlMDError`
naming the file (and leaves the previous version intact).

Reads (:func:`read_text`) refuse a missing file, a folder where a file is expected and
text that is not UTF-8, naming the file and what is wrong.

This module imports no torch, so the CLI can create a run folder within a fraction of a
second of starting.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controlmd.errors import ControlMDError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "json_safe",
    "read_json",
    "read_text",
]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one.

    :raises ControlMDError: the folder cannot be written (full disk, read-only, a file
        where a folder should be), naming the path; the old file is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ControlMDError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ControlMDError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 ``text`` written atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``json.dumps(obj, indent=2)`` written atomically (NaN/inf rejected: not valid JSON)."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def json_safe(obj: Any, *, fallback: Callable[[Any], Any] | None = None) -> Any:
    """``obj`` with tensors and numpy values turned into lists and numbers, tuples into
    lists, dict keys into strings and non-finite floats into ``None`` (JSON has no NaN);
    with ``fallback`` (e.g. ``str``), any other non-JSON value goes through it."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v, fallback=fallback) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v, fallback=fallback) for v in obj]
    if hasattr(obj, "tolist") and type(obj).__module__.split(".")[0] in ("torch", "numpy"):
        return json_safe(obj.tolist(), fallback=fallback)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if fallback is not None and not isinstance(obj, bool | int | float | str | type(None)):
        return fallback(obj)
    return obj


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``.

    :param what: what the file is, for the message (e.g. ``"experiment file"``).
    :raises ControlMDError: missing, a folder, unreadable or not UTF-8 (one line naming it).
    """
    path = Path(path)
    if path.is_dir():
        raise ControlMDError(f"{what} {str(path)!r} is a folder, not a file")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ControlMDError(f"{what} {str(path)!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ControlMDError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    except OSError as exc:
        raise ControlMDError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """The JSON value in ``path`` (errors as :func:`read_text`, plus invalid JSON)."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ControlMDError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None

"""Durable files: atomic writes (temporary file in the same folder, fsync, ``os.replace``).

A reader never sees a half-written ``checkpoint.pt``, ``metrics.json`` or protocol file:
either the old version or the new one. Training checkpoints (:func:`save_checkpoint`) hold
everything an exact resume needs: protocol and optimizer state, LR schedule, counters and
RNG states; they say so in ``"resume": "exact"``.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "json_safe",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "controlmd.checkpoint/1"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``json.dumps(obj, indent=2)`` written atomically (NaN/inf rejected: not valid JSON)."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def json_safe(obj: Any) -> Any:
    """``obj`` with tensors and numpy scalars turned into lists and numbers, tuples into
    lists, dict keys into strings and non-finite floats into ``None`` (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor | np.ndarray | np.generic):
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically write a training checkpoint (``payload`` plus format and global RNG state)."""
    atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "resume": "exact", "rng": rng_state(), **payload}, path
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (does not restore RNG state)."""
    from controlmd.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a controlmd checkpoint (format {CHECKPOINT_FORMAT})")
    return blob

"""Input checks shared by the public constructors (one gate, no checks in inner loops).

torch is imported by the checks that need it, so the scalar checks stay usable before
torch loads (the CLI creates its run folder first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from controlmd.errors import ControlMDError

if TYPE_CHECKING:
    from torch import Tensor


def check_positive(name: str, value: float | Tensor, *, allow_zero: bool = False) -> None:
    """Raise ``ControlMDError`` unless every element of ``value`` is finite and > 0 (>= 0)."""
    import torch

    t = torch.as_tensor(value)
    if t.numel() == 0:
        raise ControlMDError(f"{name} must not be empty")
    if not bool(torch.isfinite(t).all()):
        raise ControlMDError(f"{name} must be finite, got {_short(value)}")
    bad = (t < 0) if allow_zero else (t <= 0)
    if bool(bad.any()):
        op = ">= 0" if allow_zero else "> 0"
        raise ControlMDError(f"{name} must be {op}, got {_short(value)}")


def check_finite(name: str, value: Tensor) -> None:
    """Raise ``ControlMDError`` when ``value`` holds NaN or inf, saying where."""
    import torch

    if not bool(torch.isfinite(value).all()):
        bad = (~torch.isfinite(value)).nonzero()
        raise ControlMDError(
            f"{name} must be finite; found {bad.shape[0]} non-finite entries, first at index "
            f"{tuple(bad[0].tolist())}"
        )


def check_positions(name: str, R: Tensor, *, dim: int | None = None) -> None:
    """Check a batched position tensor ``[B, N, d]``: shape, floating dtype, finiteness."""
    import torch

    if not isinstance(R, torch.Tensor):
        raise ControlMDError(f"{name} must be a torch.Tensor of shape [B, N, d], got {type(R)}")
    if R.ndim != 3:
        raise ControlMDError(
            f"{name} must have shape [B, N, d] (replicas, particles, dimension), got "
            f"{tuple(R.shape)}; add a replica axis with R.unsqueeze(0) for one system"
        )
    if R.dtype not in (torch.float32, torch.float64):
        raise ControlMDError(
            f"{name} must be a float32 or float64 tensor, got dtype {R.dtype} (integer positions "
            "cannot move; half precision is not supported)"
        )
    if dim is not None and R.shape[-1] != dim:
        raise ControlMDError(f"{name} has spatial dimension {R.shape[-1]}, expected {dim}")
    check_finite(name, R)


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ``ControlMDError`` listing the valid names when ``value`` is not one of them."""
    if value not in choices:
        raise ControlMDError(
            f"unknown {name} {value!r}; expected one of: {', '.join(sorted(choices))}"
        )


def check_int(name: str, value: int, *, minimum: int = 1) -> None:
    """Raise unless ``value`` is an int (not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlMDError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ControlMDError(f"{name} must be >= {minimum}, got {value}")


def _short(value: float | Tensor) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return f"{value.item():.6g}"
        return str(value.detach().cpu().tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)

"""Small numerical helpers shared by several modules."""

from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["interp", "tensor_key"]


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation with constant extrapolation, like ``numpy.interp``.

    :param x: where to evaluate, any shape.
    :param xp: increasing knots ``[K]`` (K >= 2).
    :param fp: values at the knots ``[K]``.
    :return: values at ``x`` (the shape of ``x``).
    """
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return f0 + w * (f1 - f0)


def tensor_key(x: Tensor) -> tuple[int, int, int]:
    """``(id, version counter, data pointer)`` of ``x``: equal keys of a tensor that is still
    held (so that its id stays its own) mean the same values; an in-place edit or a new
    tensor changes the key. Raises ``RuntimeError`` for an inference tensor (no version
    counter)."""
    return (id(x), x._version, x.data_ptr())

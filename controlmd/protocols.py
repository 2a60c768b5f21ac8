"""Time-dependent control fields u(t) in R^k (and feedback fields u(t, obs)).

A :class:`Protocol` maps time ``t`` (0-d tensor, or ``[T]``) to control values ``[k]``
(or ``[T, k]``), squashed smoothly into physical bounds ``[low, high]``. Time is in the
task's time unit; u in the control channel's unit (the task states both).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from controlmd._validation import check_int, check_positive
from controlmd.errors import ControlMDError

Tensor = torch.Tensor

__all__ = ["HeldControl", "PiecewiseConstant", "Protocol"]


def _as_bounds(name: str, value: float | list[float] | Tensor | None, dim: int) -> Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.repeat(dim)
    if t.numel() != dim:
        raise ControlMDError(f"{name} has {t.numel()} entries, expected 1 or dim = {dim}")
    if not bool(torch.isfinite(t).all()):
        raise ControlMDError(f"{name} must be finite, got {t.tolist()}")
    return t


class Protocol(nn.Module):
    """Base class of control protocols.

    Subclasses implement :meth:`raw` (unbounded values); the base class squashes them into
    ``[low, high]`` with ``low + (high - low) * (1 + tanh(raw)) / 2`` when bounds are given.

    Args:
        dim: number of control channels ``k``.
        t_final: horizon ``T`` (> 0); protocols are defined on ``[0, T]``.
        low, high: physical bounds, scalars or ``[k]``; both or neither.
    """

    feedback: bool = False

    def __init__(
        self,
        *,
        dim: int,
        t_final: float,
        low: float | list[float] | Tensor | None = None,
        high: float | list[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        check_int("dim", dim)
        check_positive("t_final", t_final)
        self.dim = dim
        self.t_final = float(t_final)
        lo, hi = _as_bounds("low", low, dim), _as_bounds("high", high, dim)
        if (lo is None) != (hi is None):
            raise ControlMDError("give both low and high bounds, or neither")
        if lo is not None and hi is not None and bool((lo >= hi).any()):
            raise ControlMDError(f"bounds need low < high, got low = {lo.tolist()}, high = {hi.tolist()}")
        self.register_buffer("low", lo)
        self.register_buffer("high", hi)

    @property
    def bounded(self) -> bool:
        return self.low is not None

    @abstractmethod
    def raw(self, t: Tensor) -> Tensor:
        """Unsquashed values: ``t`` ``[T]`` -> ``[T, k]``."""

    def squash(self, raw: Tensor) -> Tensor:
        if self.low is None:
            return raw
        lo, hi = self.low.to(raw), self.high.to(raw)
        return lo + (hi - lo) * 0.5 * (1.0 + torch.tanh(raw))

    def unsquash(self, u: Tensor) -> Tensor:
        """Inverse of :meth:`squash` (values strictly inside the bounds)."""
        if self.low is None:
            return u
        lo, hi = self.low.to(u), self.high.to(u)
        y = (2.0 * (u - lo) / (hi - lo) - 1.0).clamp(-1 + 1e-12, 1 - 1e-12)
        return torch.atanh(y)

    def forward(self, t: Tensor | float, obs: Tensor | None = None) -> Tensor:
        """u(t): ``t`` 0-d -> ``[k]``; ``t`` ``[T]`` -> ``[T, k]``."""
        t = torch.as_tensor(t, dtype=self._dtype())
        scalar = t.ndim == 0
        u = self.squash(self.raw(t.reshape(-1)))
        return u[0] if scalar else u

    def breakpoints(self) -> list[float]:
        """Times at which u(t) jumps (handed to adaptive solvers as ``jump_t``)."""
        return []

    def sample(self, n: int = 200) -> tuple[Tensor, Tensor]:
        """Table ``(t [n], u [n, k])`` on a uniform grid of ``[0, T]``, for plots and replay."""
        t = torch.linspace(0.0, self.t_final, n, dtype=self._dtype())
        with torch.no_grad():
            return t, self(t)

    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        for b in self.buffers():
            return b.dtype
        return torch.float64


class PiecewiseConstant(Protocol):
    """u(t) constant on each of ``K`` equal pieces of ``[0, T]``.

    A ``K``-piece protocol controls exactly what a ``K``-step episode of the gymnasium env
    controls. Piece ``j`` covers ``[j T/K, (j+1) T/K)``; ``t = T`` belongs to the last piece.

    Args:
        n_pieces: ``K``.
        init: initial values, scalar, ``[k]`` or ``[K, k]`` (inside the bounds).
    """

    def __init__(
        self,
        *,
        dim: int = 1,
        t_final: float,
        n_pieces: int,
        low: float | list[float] | Tensor | None = None,
        high: float | list[float] | Tensor | None = None,
        init: float | list[float] | Tensor | None = None,
    ) -> None:
        super().__init__(dim=dim, t_final=t_final, low=low, high=high)
        check_int("n_pieces", n_pieces)
        self.n_pieces = n_pieces
        values = torch.zeros(n_pieces, dim, dtype=torch.float64)
        if init is not None:
            v = torch.as_tensor(init, dtype=torch.float64)
            values = values + (v.reshape(n_pieces, dim) if v.numel() == n_pieces * dim else v)
            values = self.unsquash(values)
        elif self.low is not None:
            values = self.unsquash(0.5 * (self.low + self.high).expand(n_pieces, dim))
        self.values = nn.Parameter(values)

    def piece_index(self, t: Tensor) -> Tensor:
        idx = torch.floor(t / self.t_final * self.n_pieces).long()
        return idx.clamp(0, self.n_pieces - 1)

    def raw(self, t: Tensor) -> Tensor:
        return self.values[self.piece_index(t)]

    def breakpoints(self) -> list[float]:
        return [self.t_final * j / self.n_pieces for j in range(1, self.n_pieces)]


class HeldControl(Protocol):
    """A control value set from outside and held until changed (the gymnasium env's action).

    ``set(u)`` with ``u`` of shape ``[k]`` (same for all replicas) or ``[B, k]`` (one value
    per replica); ``forward`` returns it whatever ``t`` is.
    """

    def __init__(self, *, dim: int, t_final: float, value: Tensor | None = None) -> None:
        super().__init__(dim=dim, t_final=t_final)
        self.register_buffer("value", torch.zeros(dim, dtype=torch.float64) if value is None else value)

    def set(self, u: Tensor) -> None:
        if u.shape[-1] != self.dim:
            raise ControlMDError(f"control value has last dimension {u.shape[-1]}, expected {self.dim}")
        self.value = u.detach().to(torch.float64)

    def raw(self, t: Tensor) -> Tensor:
        raise NotImplementedError  # forward is overridden

    def forward(self, t: Tensor | float, obs: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t)
        if t.ndim == 0:
            return self.value
        return self.value.expand(t.shape[0], *self.value.shape)


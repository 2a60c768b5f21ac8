"""Piecewise protocols: K equal constant pieces (the env's K-step episode), sampled tables."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from controlmd._validation import check_choice, check_int
from controlmd.errors import ControlMDError
from controlmd.numerics import tensor_key
from controlmd.protocols.base import InitSpec, Protocol, Tensor, _interp, register_protocol


@register_protocol("piecewise_constant")
class PiecewiseConstant(Protocol):
    """u(t) constant on each of ``K`` equal pieces of ``[0, T]``.

    A ``K``-piece protocol controls exactly what a ``K``-step episode of the gymnasium env
    controls. Piece ``j`` covers ``[j T/K, (j+1) T/K)``; ``t = T`` belongs to the last piece.

    Args:
        n_pieces: ``K``.
        init: initial values, scalar, ``[k]`` or ``[K, k]`` (inside the bounds); also any
            :data:`InitSpec`, then each piece takes the value at its midpoint.
        dim, t_final, low, high, fluence_weight: see :class:`Protocol`.
        release_fraction, release_value, field_cost_weight: see :class:`Protocol`.
    """

    init_in_constructor = True
    pure_in_time = True

    def __init__(
        self,
        *,
        dim: int = 1,
        t_final: float,
        n_pieces: int,
        low: float | list[float] | Tensor | None = None,
        high: float | list[float] | Tensor | None = None,
        init: InitSpec | None = None,
        fluence_weight: float = 0.0,
        release_fraction: float = 0.0,
        release_value: float | list[float] | Tensor | None = None,
        field_cost_weight: float = 0.0,
    ) -> None:
        super().__init__(
            dim=dim,
            t_final=t_final,
            low=low,
            high=high,
            fluence_weight=fluence_weight,
            release_fraction=release_fraction,
            release_value=release_value,
            field_cost_weight=field_cost_weight,
        )
        check_int("n_pieces", n_pieces)
        self.n_pieces = n_pieces
        values = torch.zeros(n_pieces, dim, dtype=torch.float64)
        if init is not None:
            target = self._piece_values(init)
            self._check_inside_bounds(target)
            values = self.unsquash(target)
        elif isinstance(self.low, Tensor) and isinstance(self.high, Tensor):  # bounded
            values = self.unsquash(0.5 * (self.low + self.high).expand(n_pieces, dim))
        self.values = nn.Parameter(values)

    def _piece_values(self, init: InitSpec) -> Tensor:
        if not callable(init):
            v = torch.as_tensor(init, dtype=torch.float64)
            if v.numel() == self.n_pieces * self.dim:
                return v.reshape(self.n_pieces, self.dim).clone()
            if v.numel() in (1, self.dim):
                return v.reshape(1, -1).expand(self.n_pieces, self.dim).clone()
        mid = (
            (torch.arange(self.n_pieces, dtype=torch.float64) + 0.5) * self.t_final / self.n_pieces
        )
        return self._target_values(init, mid)

    def piece_index(self, t: Tensor) -> Tensor:
        idx = torch.floor(t / self.t_final * self.n_pieces).long()
        return idx.clamp(0, self.n_pieces - 1)

    def raw(self, t: Tensor) -> Tensor:
        return self.values[self.piece_index(t)]

    def breakpoints(self) -> list[float]:
        return [self.t_final * j / self.n_pieces for j in range(1, self.n_pieces)]

    def _fit_raw(self, t: Tensor, raw_target: Tensor) -> None:
        idx = self.piece_index(t)
        sums = torch.zeros_like(self.values).index_add_(0, idx, raw_target.to(self.values))
        counts = torch.bincount(idx, minlength=self.n_pieces).clamp(min=1).to(self.values)
        self.values.copy_(sums / counts[:, None])


@register_protocol("table")
class Tabulated(Protocol):
    """Replay of a sampled table ``(times [n], values [n, k])`` (e.g. :meth:`Protocol.sample`).

    Values between rows are interpolated linearly (``interpolation="linear"``) or held from
    the last row (``"hold"``, which reports the row times as breakpoints). The values are
    parameters, so a table can also be trained.

    Args:
        times: increasing times ``[n]`` covering ``[0, t_final]``.
        values: ``[n, k]`` (or ``[n]`` for one channel), inside the bounds if given.
        interpolation: ``linear`` or ``hold``.
        t_final: horizon (default: the last time).
        low, high, fluence_weight: see :class:`Protocol`.
        release_fraction, release_value, field_cost_weight: see :class:`Protocol`.
    """

    pure_in_time = True
    times: Tensor  # buffer [n]

    def __init__(
        self,
        *,
        times: Sequence[float] | Tensor,
        values: Sequence[float] | Sequence[Sequence[float]] | Tensor,
        interpolation: str = "linear",
        t_final: float | None = None,
        low: float | list[float] | Tensor | None = None,
        high: float | list[float] | Tensor | None = None,
        fluence_weight: float = 0.0,
        release_fraction: float = 0.0,
        release_value: float | list[float] | Tensor | None = None,
        field_cost_weight: float = 0.0,
    ) -> None:
        check_choice("interpolation", interpolation, ["linear", "hold"])
        ts = torch.as_tensor(times, dtype=torch.float64).flatten()
        vs = torch.as_tensor(values, dtype=torch.float64)
        vs = vs.unsqueeze(-1) if vs.ndim == 1 else vs
        if ts.numel() < 1 or vs.ndim != 2 or vs.shape[0] != ts.numel():
            raise ControlMDError(
                f"table needs times [n] and values [n, k], got {tuple(ts.shape)} and {tuple(vs.shape)}"
            )
        if ts.numel() > 1 and not bool((ts[1:] > ts[:-1]).all()):
            raise ControlMDError("table times must be strictly increasing")
        super().__init__(
            dim=vs.shape[1],
            t_final=float(ts[-1]) if t_final is None else t_final,
            low=low,
            high=high,
            fluence_weight=fluence_weight,
            release_fraction=release_fraction,
            release_value=release_value,
            field_cost_weight=field_cost_weight,
        )
        if self.low is not None and self.high is not None:
            lo, hi = self.low.to(vs), self.high.to(vs)
            slack = 1e-9 * (hi - lo)  # a table sampled from a squashed protocol may touch a bound
            outside = (vs < lo - slack) | (vs > hi + slack)
            if bool(outside.any()):
                i, j = (int(x) for x in outside.nonzero()[0])
                raise ControlMDError(
                    f"values[{i}][{j}] = {float(vs[i, j])!r} lies outside channel {j}'s bounds "
                    f"[{float(lo[j])!r}, {float(hi[j])!r}] (it would be clipped silently)"
                )
        self.interpolation = interpolation
        self.register_buffer("times", ts)
        self.values = nn.Parameter(self.unsquash(vs))

    def raw(self, t: Tensor) -> Tensor:
        if self.times.numel() == 1:
            return self.values.expand(t.shape[0], self.dim)
        if self.interpolation == "linear":
            if (
                t.numel() == 1
                and t.device.type == "cpu"
                and t.dtype == self.values.dtype == self.times.dtype == torch.float64
                and self.values.device.type == "cpu"
                and not torch.is_grad_enabled()
                and not (self.values.is_inference() or self.times.is_inference())
            ):
                return self._raw_at(t.item())
            times = self.times
            if times.dtype != t.dtype or times.device != t.device:
                times = times.to(t)
            return _interp(t, times, self.values)
        idx = (
            torch.searchsorted(self.times.to(t).contiguous(), t.contiguous(), right=True) - 1
        ).clamp(0, self.times.numel() - 1)
        return self.values[idx]

    def _raw_at(self, t: float) -> Tensor:
        """:func:`_interp` at one time without a graph, in Python floats: ``[1, k]``.

        Float64 tables on the CPU only, where Python's float arithmetic is the tensors'
        (IEEE double; each operation of :func:`_interp` rounded once, in the same order;
        ``bisect_right`` is ``searchsorted(right=True)``), so the values are bit-identical,
        in ~2 tensor operations instead of ~18. The table is read into Python once per
        version of ``times`` and ``values`` (both held, so their identities stay theirs)."""
        times, values = self.times, self.values
        key = (tensor_key(times), tensor_key(values))
        hit = self.__dict__.get("_table")
        if hit is None or hit[0] != key:
            hit = self.__dict__["_table"] = (key, times.tolist(), values.tolist(), (times, values))
        knots, rows = hit[1], hit[2]
        i = min(max(bisect.bisect_right(knots, t), 1), len(knots) - 1)
        t0, t1 = knots[i - 1], knots[i]
        w = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
        row = [a * (1.0 - w) + b * w for a, b in zip(rows[i - 1], rows[i])]
        if len(row) == 1:  # one operation instead of torch.tensor's four
            return torch.full((1, 1), row[0], dtype=torch.float64)
        return torch.tensor([row], dtype=torch.float64)

    def breakpoints(self) -> list[float]:
        return self.times[1:].tolist() if self.interpolation == "hold" else []

    def _fit_raw(self, t: Tensor, raw_target: Tensor) -> None:
        self.values.copy_(_interp(self.times.to(t), t, raw_target))

    @classmethod
    def from_csv(cls, path: str | Path, **kwargs: Any) -> Tabulated:
        """Read a table written by :meth:`Protocol.write_table`."""
        lines = Path(path).read_text().strip().splitlines()
        rows = torch.tensor(
            [[float(x) for x in line.split(",")] for line in lines[1:]], dtype=torch.float64
        )
        return cls(times=rows[:, 0], values=rows[:, 1:], **kwargs)

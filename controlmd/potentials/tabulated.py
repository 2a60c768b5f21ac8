"""Tabulated pair potential ``u(r)`` on a grid (iterative Boltzmann inversion, coarse graining).

Units: reduced LJ units (lengths sigma, energies epsilon).

The table ``u_k = u(r_k)`` on an increasing grid ``r_0 < ... < r_{K-1}`` is interpolated by
a natural cubic spline (default; continuous force) or piecewise-linearly; the force is the
exact derivative of the interpolant (autograd). Below ``r_0`` the interpolant continues
linearly with its slope at ``r_0`` (finite, repulsive if the table is); beyond
``r_cut = r_{K-1}`` the energy is zero, with the usual energy/force shift options. Table
values may be learnable (``nn.Parameter``); the spline is a fixed linear map of them, so
gradients reach every table entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from controlmd._validation import check_choice
from controlmd.errors import ControlMDError
from controlmd.potentials.pair import PairPotential
from controlmd.space import Space

if TYPE_CHECKING:
    from controlmd.neighbors import NeighborList

Tensor = torch.Tensor

__all__ = ["TabulatedPair"]

INTERPOLATIONS = ("cubic", "linear")


def _natural_spline_map(x: Tensor) -> Tensor:
    """Matrix ``M [K, K]`` with ``m = M y`` the second derivatives of the natural cubic spline."""
    K = x.shape[0]
    h = x[1:] - x[:-1]
    A = torch.zeros(K, K, dtype=x.dtype)
    Bm = torch.zeros(K, K, dtype=x.dtype)
    A[0, 0] = A[-1, -1] = 1.0  # natural ends: m_0 = m_{K-1} = 0
    for k in range(1, K - 1):
        A[k, k - 1] = h[k - 1] / 6
        A[k, k] = (h[k - 1] + h[k]) / 3
        A[k, k + 1] = h[k] / 6
        Bm[k, k - 1] = 1.0 / h[k - 1]
        Bm[k, k] = -1.0 / h[k - 1] - 1.0 / h[k]
        Bm[k, k + 1] = 1.0 / h[k]
    M: Tensor = torch.linalg.solve(A, Bm)
    return M


class TabulatedPair(PairPotential):
    """Pair potential interpolated from a table.

    Args:
        space: the box.
        r: grid ``[K]`` (K >= 2 linear, >= 3 cubic), strictly increasing, ``r[0] > 0``; the
            last point is the cutoff.
        u: values ``[K]`` (energy units).
        interpolation: ``"cubic"`` (natural spline) or ``"linear"``.
        shift: ``"energy"`` (default; makes u continuous at the cutoff), ``"force"`` or ``"none"``.
        learnable: make the table values an ``nn.Parameter``.
        pairs, exclude, neighbor_list: pair selection (see :class:`~controlmd.potentials.pair.PairPotential`).
    """

    grid: Tensor  # buffer [K]: r_k
    values: Tensor  # buffer or nn.Parameter [K]: u_k
    _spline: Tensor  # buffer [K, K] (cubic) mapping values to spline moments, else [0, 0]

    def __init__(
        self,
        space: Space | None = None,
        *,
        r: Sequence[float] | Tensor,
        u: Sequence[float] | Tensor,
        interpolation: str = "cubic",
        shift: str = "energy",
        learnable: bool = False,
        pairs: Tensor | Sequence[Sequence[int]] | None = None,
        exclude: Tensor | Sequence[Sequence[int]] | None = None,
        neighbor_list: NeighborList | None = None,
    ) -> None:
        check_choice("interpolation", interpolation, INTERPOLATIONS)
        grid = torch.as_tensor(r, dtype=torch.float64).detach().clone()
        values = torch.as_tensor(u, dtype=torch.float64).detach().clone()
        minimum = 3 if interpolation == "cubic" else 2
        if grid.ndim != 1 or grid.shape[0] < minimum:
            raise ControlMDError(
                f"r must be a 1-D grid of >= {minimum} points, got shape {tuple(grid.shape)}"
            )
        if values.shape != grid.shape:
            raise ControlMDError(
                f"u must have the grid's shape {tuple(grid.shape)}, got {tuple(values.shape)}"
            )
        if not bool(torch.isfinite(grid).all()) or not bool(torch.isfinite(values).all()):
            raise ControlMDError(
                "r and u must be finite (cap the repulsive core of a Boltzmann-inverted table)"
            )
        if float(grid[0]) <= 0 or not bool((grid[1:] > grid[:-1]).all()):
            raise ControlMDError(
                f"r must be strictly increasing with r[0] > 0, got r[0] = {float(grid[0]):g}"
            )
        super().__init__(
            space,
            r_cut=float(grid[-1]),
            shift=shift,
            pairs=pairs,
            exclude=exclude,
            neighbor_list=neighbor_list,
        )
        self.interpolation = interpolation
        self.register_buffer("grid", grid)
        if learnable:
            self.values = nn.Parameter(values)
        else:
            self.register_buffer("values", values)
        spline = (
            _natural_spline_map(grid)
            if interpolation == "cubic"
            else torch.zeros(0, 0, dtype=torch.float64)
        )
        self.register_buffer("_spline", spline, persistent=False)

    @classmethod
    def from_function(
        cls,
        fn: Callable[[Tensor], Tensor],
        r: Sequence[float] | Tensor,
        space: Space | None = None,
        **kwargs: Any,
    ) -> TabulatedPair:
        """Tabulate ``fn`` (a function of a distance tensor) on the grid ``r``."""
        grid = torch.as_tensor(r, dtype=torch.float64)
        return cls(space, r=grid, u=fn(grid), **kwargs)

    @torch.no_grad()
    def set_table(self, u: Tensor) -> None:
        """Replace the table values in place (e.g. one IBI update); shape ``[K]``."""
        u = torch.as_tensor(u, dtype=self.values.dtype)
        if u.shape != self.values.shape or not bool(torch.isfinite(u).all()):
            raise ControlMDError(
                f"table must be finite with shape {tuple(self.values.shape)}, got {tuple(u.shape)}"
            )
        self.values.copy_(u)

    def pair_energy(self, r: Tensor, **params: Tensor) -> Tensor:
        x = self.grid.to(r.dtype)
        y = self.values.to(r.dtype)
        K = x.shape[0]
        k = torch.clamp(torch.searchsorted(x, r.detach().contiguous(), right=True) - 1, 0, K - 2)
        x0, x1, y0, y1 = x[k], x[k + 1], y[k], y[k + 1]
        h = x1 - x0
        below = r < x[0]
        rr = torch.where(
            below, x[0].expand_as(r), r
        )  # evaluate the table at r_0, extrapolate after
        a = (x1 - rr) / h
        b = 1.0 - a
        val = a * y0 + b * y1
        if self.interpolation == "cubic":
            m = self._spline.to(r.dtype) @ y
            m0, m1 = m[k], m[k + 1]
            val = val + ((a**3 - a) * m0 + (b**3 - b) * m1) * h * h / 6.0
            slope0 = (y[1] - y[0]) / (x[1] - x[0]) - (x[1] - x[0]) / 6.0 * (2 * m[0] + m[1])
        else:
            slope0 = (y[1] - y[0]) / (x[1] - x[0])
        return torch.where(below, y[0] + slope0 * (r - x[0]), val)

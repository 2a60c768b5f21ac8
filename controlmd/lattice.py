"""Initial configurations: particles on a lattice filling a periodic box at a given density.

Units: lengths in sigma (reduced LJ units); density is particles per sigma^d.

``lattice(kind, n, density=...)`` returns positions ``[n, d]`` and box sides ``[d]``
(give them to :func:`controlmd.space.periodic`). When ``n`` does not fill the lattice
exactly, the smallest lattice with at least ``n`` sites is used and ``n`` sites are
taken evenly spread over it (the vacancies are spread out too); the density is exact
either way. Momenta (Maxwell–Boltzmann) come from the integrators' ``init``.

Example:
    >>> R, box = lattice("fcc", 256, density=0.8)
    >>> R.shape, [round(x, 4) for x in box.tolist()]
    (torch.Size([256, 3]), [6.8399, 6.8399, 6.8399])
"""

from __future__ import annotations

import math

import torch

from controlmd._validation import check_choice, check_int, check_positive

Tensor = torch.Tensor

__all__ = ["LATTICES", "lattice"]

_BASES: dict[str, list[list[float]]] = {
    "sc": [[0.0, 0.0, 0.0]],
    "bcc": [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]],
    "fcc": [[0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]],
    "square": [[0.0, 0.0]],
}
LATTICES = ("bcc", "fcc", "hexagonal", "sc", "square")
"""Known lattice kinds: 3-D ``sc``, ``bcc``, ``fcc``; 2-D ``square``, ``hexagonal`` (triangular)."""


def lattice(
    kind: str, n: int, *, density: float, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """``n`` lattice sites in a periodic box at number density ``density``.

    Args:
        kind: one of :data:`LATTICES`.
        n: number of particles.
        density: particles per unit volume (area in 2-D), > 0.
        dtype: floating dtype of the result.

    Returns:
        ``(R [n, d], box [d])``: positions inside ``[0, L)`` and the box side lengths.
        Cubic kinds give a cubic box (square for ``square``); ``hexagonal`` gives a
        rectangular box of an even number of rows, close to square.
    """
    check_choice("kind", kind, LATTICES)
    check_int("n", n)
    check_positive("density", density)
    if kind == "hexagonal":
        sites, box = _hexagonal(n, density)
    else:
        basis = torch.tensor(_BASES[kind], dtype=torch.float64)
        d = basis.shape[1]
        m = math.ceil((n / basis.shape[0]) ** (1.0 / d) - 1e-9)
        side = (n / density) ** (1.0 / d)
        cells = torch.stack(
            torch.meshgrid(*[torch.arange(m, dtype=torch.float64)] * d, indexing="ij"), -1
        )
        sites = ((cells.reshape(-1, 1, d) + basis) * (side / m)).reshape(-1, d)
        box = torch.full((d,), side, dtype=torch.float64)
    if sites.shape[0] > n:
        keep = torch.round(torch.linspace(0, sites.shape[0] - 1, n, dtype=torch.float64)).long()
        sites = sites[keep]
    return sites.to(dtype), box.to(dtype)


def _hexagonal(n: int, density: float) -> tuple[Tensor, Tensor]:
    """Triangular lattice: rows spaced ``a sqrt(3)/2``, odd rows shifted by ``a/2``."""
    nx = max(1, math.ceil(math.sqrt(n * math.sqrt(3) / 2) - 1e-9))
    ny = math.ceil(n / nx)
    ny += ny % 2  # an even number of rows keeps the lattice periodic in y
    a = math.sqrt(n / (density * nx * ny * math.sqrt(3) / 2))
    j, i = torch.meshgrid(
        torch.arange(ny, dtype=torch.float64), torch.arange(nx, dtype=torch.float64), indexing="ij"
    )
    x = (i + 0.5 * (j % 2)) * a
    y = j * a * math.sqrt(3) / 2
    sites = torch.stack([x.reshape(-1), y.reshape(-1)], -1)
    box = torch.tensor([nx * a, ny * a * math.sqrt(3) / 2], dtype=torch.float64)
    return sites, box

"""Verlet neighbor lists with a skin, batched over replicas, built by cell list or brute force.

Units: lengths in the task's length unit (sigma in reduced LJ units).

Pair format
-----------
A :class:`NeighborPairs` is a *flat half list*: every pair ``i < j`` of the same replica
with ``|r_i - r_j| < r_cut + skin`` appears once, as indices ``i, j`` into the flattened
positions ``R.reshape(B * N, d)``, with its replica index. A pair term gathers
``R[i], R[j]``, evaluates ``u`` on ``[M]`` pairs and sums per replica with ``index_add`` —
no Python loop over particles or replicas, and no ``O(N^2)`` work between rebuilds.

The list has a **dynamic size**: it is rebuilt as a new tensor of whatever length is
needed, so it cannot overflow and never drops pairs (eager PyTorch has no reason for
fixed-capacity buffers). ``max_neighbors`` reports the largest per-particle count seen.

Rebuilds
--------
:meth:`NeighborList.allocate` builds the list (outside autograd, from detached positions)
and records the reference positions. :meth:`NeighborList.update` returns the current list,
rebuilding it first when any particle has moved more than ``skin / 2`` since the last build
(then no pair can have come from outside ``r_cut + skin`` to inside ``r_cut``), when the
batch or particle count changed, or when positions are not finite (the rebuild raises).

Builders (both compute image distances per axis from ``space.box`` on wrapped positions,
for speed; the tests check them against ``space.displacement``): a **cell list** (periodic boxes with at least 3 cells of side >= ``r_cut + skin``
per axis; each particle scans the ``3^d`` surrounding cells) or **brute force** over all
pairs in row chunks (``O(N^2)`` per rebuild, memory bounded by ``chunk_elements``), chosen
automatically.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from controlmd._validation import check_choice, check_int, check_positions, check_positive
from controlmd.errors import ControlMDError
from controlmd.space import Space

Tensor = torch.Tensor

__all__ = ["NeighborList", "NeighborPairs", "brute_force_pairs"]

METHODS = ("auto", "brute", "cell")


def index_pairs(name: str, pairs: Tensor | Sequence[Sequence[int]]) -> Tensor:
    """``pairs`` as a ``[P, 2]`` long tensor of distinct non-negative particle indices
    (a clear error naming ``name`` otherwise)."""
    p = torch.as_tensor(pairs)
    if p.numel() == 0:
        p = p.reshape(0, 2)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ControlMDError(
            f"{name} must have shape [P, 2] (particle index pairs), got {tuple(p.shape)}"
        )
    if p.is_floating_point() or p.dtype == torch.bool:
        raise ControlMDError(f"{name} must hold integer particle indices, got dtype {p.dtype}")
    p = p.long()
    if bool((p < 0).any()):
        raise ControlMDError(
            f"{name} must hold non-negative particle indices, got min {int(p.min())}"
        )
    if bool((p[:, 0] == p[:, 1]).any()):
        k = int((p[:, 0] == p[:, 1]).nonzero()[0])
        raise ControlMDError(f"{name} row {k} pairs particle {int(p[k, 0])} with itself")
    return p


@dataclass(frozen=True)
class NeighborPairs:
    """Flat half list of candidate pairs over a batch of replicas.

    Attributes:
        i, j: indices ``[M]`` into ``R.reshape(B * N, d)``, with ``i < j`` and both in the
            same replica.
        replica: replica of each pair ``[M]`` (``i // N``).
        n_replicas: ``B``.
        n_particles: ``N``.
    """

    i: Tensor
    j: Tensor
    replica: Tensor
    n_replicas: int
    n_particles: int

    def __len__(self) -> int:
        return int(self.i.shape[0])

    def local(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(replica, i_local, j_local)`` with particle indices in ``[0, N)``."""
        N = self.n_particles
        return self.replica, self.i - self.replica * N, self.j - self.replica * N


class NeighborList:
    """A Verlet list with skin for ``B`` replicas of ``N`` particles.

    Args:
        space: the box (distances via ``space.displacement``).
        r_cut: interaction cutoff (> 0), the largest cutoff of the terms using the list.
        skin: extra radius (>= 0); the list holds pairs within ``r_cut + skin`` and is
            rebuilt once a particle moved more than ``skin / 2``. ``r_cut + skin`` must be at
            most half the shortest box side.
        exclude: pairs ``[E, 2]`` never listed (e.g. bonded neighbours).
        method: ``"auto"`` (cell list when the box holds >= 3 cells per axis and the
            ``3^d`` stencil is less than half the box, else brute force), ``"cell"`` or
            ``"brute"``.
        chunk_elements: bound on the number of candidate pairs examined at once during a
            rebuild (memory control).

    Example:
        >>> import torch
        >>> from controlmd.space import periodic
        >>> nl = NeighborList(periodic(10.0, dim=2), r_cut=2.0, skin=0.5)
        >>> R = torch.tensor([[[1.0, 1.0], [2.0, 1.0], [9.5, 1.0], [5.0, 5.0]]], dtype=torch.float64)
        >>> pairs = nl.allocate(R)  # 1-2 at 2.5 is not < r_cut + skin
        >>> pairs.i.tolist(), pairs.j.tolist()
        ([0, 0], [1, 2])
    """

    def __init__(
        self,
        space: Space,
        r_cut: float,
        *,
        skin: float = 0.3,
        exclude: Tensor | Sequence[Sequence[int]] | None = None,
        method: str = "auto",
        chunk_elements: int = 1 << 18,
    ) -> None:
        if not isinstance(space, Space):
            raise ControlMDError(
                f"space must be a Space (free() or periodic(box)), got {type(space)}"
            )
        check_positive("r_cut", r_cut)
        check_positive("skin", skin, allow_zero=True)
        check_choice("method", method, METHODS)
        check_int("chunk_elements", chunk_elements)
        self.space = space
        self.r_cut = float(r_cut)
        self.skin = float(skin)
        self.method = method
        self.chunk_elements = chunk_elements
        space.check_cutoff("r_cut + skin", self.r_list)
        if method == "cell" and not space.periodic:
            raise ControlMDError("method = 'cell' needs a periodic box; use 'brute' in free space")
        if exclude is not None:
            ex = torch.sort(index_pairs("exclude", exclude), dim=1).values
            self._exclude: Tensor | None = ex
        else:
            self._exclude = None
        self._pairs: NeighborPairs | None = None
        self._reference: Tensor | None = None
        self.n_builds = 0
        self.max_neighbors = 0

    @property
    def r_list(self) -> float:
        """List radius ``r_cut + skin``."""
        return self.r_cut + self.skin

    @property
    def pairs(self) -> NeighborPairs | None:
        """The current list (``None`` before :meth:`allocate`)."""
        return self._pairs

    def allocate(self, R: Tensor) -> NeighborPairs:
        """Build the list from positions ``[B, N, d]`` (no gradient flows through it)."""
        R = R.detach()  # also keeps the checks below out of autograd (checkpoint recompute)
        check_positions("R", R)
        with torch.no_grad():
            method = self._choose_method(R)
            if method == "cell":
                pairs = self._build_cell(R)
            else:
                pairs = brute_force_pairs(
                    self.space, R, self.r_list, chunk_elements=self.chunk_elements
                )
            pairs = self._apply_exclusions(pairs)
            counts = torch.bincount(
                torch.cat([pairs.i, pairs.j]), minlength=R.shape[0] * R.shape[1]
            )
            self.max_neighbors = max(self.max_neighbors, int(counts.max()) if counts.numel() else 0)
        self._pairs = pairs
        self._reference = R.clone()
        self.n_builds += 1
        return pairs

    def needs_rebuild(self, R: Tensor) -> bool:
        """True when the list is missing, stale (a particle moved > skin/2), or shapes changed."""
        ref = self._reference
        if ref is None or ref.shape != R.shape or ref.dtype != R.dtype or ref.device != R.device:
            return True
        with torch.no_grad():
            dR = self.space.displacement(R.detach(), ref)
            moved2 = float((dR * dR).sum(dim=-1).max())
        # `not <=` is also true for NaN, so a non-finite state reaches allocate() and raises.
        return not moved2 <= (0.5 * self.skin) ** 2

    def update(self, R: Tensor) -> NeighborPairs:
        """The list valid for ``R``, rebuilt first when needed (see the module docstring)."""
        if self.needs_rebuild(R):
            return self.allocate(R)
        assert self._pairs is not None
        return self._pairs

    # -- builders ---------------------------------------------------------------------------

    def _cells_per_axis(self) -> Tensor | None:
        if self.space.box is None:
            return None
        return torch.floor(self.space.box / self.r_list).long()

    def _choose_method(self, R: Tensor) -> str:
        if self.method != "auto":
            if self.method == "cell":
                nc = self._cells_per_axis()
                assert nc is not None
                if bool((nc < 3).any()):
                    raise ControlMDError(
                        f"method = 'cell' needs >= 3 cells of side >= r_cut + skin = {self.r_list:g} "
                        f"per axis, the box {self.space.box.tolist()} gives {nc.tolist()}; use 'brute'"  # type: ignore[union-attr]
                    )
            return self.method
        nc = self._cells_per_axis()
        if nc is None or bool((nc < 3).any()):
            return "brute"
        stencil_fraction = 3 ** R.shape[-1] / float(torch.prod(nc))
        return "cell" if stencil_fraction < 0.5 else "brute"

    def _apply_exclusions(self, pairs: NeighborPairs) -> NeighborPairs:
        if self._exclude is None or len(pairs) == 0:
            return pairs
        N = pairs.n_particles
        ex = self._exclude.to(pairs.i.device)
        if int(ex.max()) >= N:
            raise ControlMDError(
                f"exclude refers to particle {int(ex.max())} but R has only N = {N}"
            )
        _, il, jl = pairs.local()
        keep = ~torch.isin(il * N + jl, ex[:, 0] * N + ex[:, 1])
        return NeighborPairs(pairs.i[keep], pairs.j[keep], pairs.replica[keep], pairs.n_replicas, N)

    def _build_cell(self, R: Tensor) -> NeighborPairs:
        B, N, d = R.shape
        box = self.space.box
        assert box is not None
        nc = self._cells_per_axis()
        assert nc is not None
        nc = nc.to(R.device)
        box_r = box.to(R)
        cell_size = box_r / nc.to(R.dtype)
        Rw = self.space.wrap(R)
        coord = torch.floor(Rw / cell_size).long()
        coord = torch.minimum(torch.clamp(coord, min=0), nc - 1)  # guards rounding at x == L
        strides = torch.ones(d, dtype=torch.long, device=R.device)
        for a in range(d - 2, -1, -1):
            strides[a] = strides[a + 1] * nc[a + 1]
        n_cells = int(torch.prod(nc))
        flat = torch.arange(B * N, device=R.device)
        cell = (coord * strides).sum(-1).reshape(-1) + (flat // N) * n_cells  # global cell id [B*N]

        order = torch.argsort(cell, stable=True)
        sorted_cell = cell[order]
        counts = torch.bincount(cell, minlength=B * n_cells)
        cap = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(B * N, device=R.device) - starts[sorted_cell]
        table = torch.full((B * n_cells, cap), -1, dtype=torch.long, device=R.device)
        table[sorted_cell, rank] = order

        offsets = torch.tensor(
            list(itertools.product((-1, 0, 1), repeat=d)), device=R.device
        )  # [S, d]
        S = offsets.shape[0]
        axes = [Rw[..., a].reshape(-1) for a in range(d)]  # d x [B*N], wrapped
        sides = box_r.tolist()
        coord_f = coord.reshape(B * N, d)
        replica_f = flat // N
        rl2 = self.r_list**2
        chunk = max(1, self.chunk_elements // (S * cap))
        out_i, out_j = [], []
        for start in range(0, B * N, chunk):
            p = flat[start : start + chunk]
            nb = torch.remainder(coord_f[p].unsqueeze(1) + offsets, nc)  # [C, S, d]
            nb_cell = (nb * strides).sum(-1) + (replica_f[p] * n_cells).unsqueeze(1)  # [C, S]
            cand = table[nb_cell].reshape(p.shape[0], S * cap)  # [C, S*cap], -1 = empty slot
            valid = cand > p.unsqueeze(1)
            cj = torch.where(valid, cand, p.unsqueeze(1))
            r2 = torch.zeros(cj.shape, dtype=R.dtype, device=R.device)
            for a in range(d):
                dx = (axes[a][cj] - axes[a][p].unsqueeze(1)).abs_()
                dx = torch.minimum(dx, sides[a] - dx)
                r2 += dx * dx
            ci, cjj = (valid & (r2 < rl2)).nonzero(as_tuple=True)
            out_i.append(p[ci])
            out_j.append(cand[ci, cjj])
        i = torch.cat(out_i)
        j = torch.cat(out_j)
        return NeighborPairs(i, j, i // N, B, N)


def brute_force_pairs(
    space: Space, R: Tensor, r_list: float, *, chunk_elements: int = 1 << 18
) -> NeighborPairs:
    """All pairs ``i < j`` of each replica with ``|r_i - r_j| < r_list`` (``O(N^2)``, chunked).

    Rows are processed in blocks, each against the columns after the block start only (the
    half list), with per-axis minimum-image distances of wrapped positions: contiguous
    ``[B, rows, N]`` arithmetic is several times faster than reducing ``[B, rows, N, d]``
    displacements over their last axis.

    Args:
        space: the box.
        R: positions ``[B, N, d]`` (not differentiated).
        r_list: radius.
        chunk_elements: bound on ``B * rows * N`` distances held at once.

    Returns:
        The flat half list (see :class:`NeighborPairs`), ordered by replica, then ``i``, then ``j``.
    """
    B, N, d = R.shape
    X = space.wrap(R.detach())
    box = None if space.box is None else space.box.to(X).tolist()
    axes = [X[..., a].contiguous() for a in range(d)]  # d x [B, N]
    rows = max(1, min(N, chunk_elements // max(1, B * N)))
    rl2 = r_list**2
    out_b, out_i, out_j = [], [], []
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        r2 = torch.zeros(B, stop - start, N - start, dtype=X.dtype, device=X.device)
        for a in range(d):
            dx = (axes[a][:, start:stop, None] - axes[a][:, None, start:]).abs_()
            if (
                box is not None
            ):  # wrapped coordinates: |dx| < L, the image distance is min(|dx|, L - |dx|)
                dx = torch.minimum(dx, box[a] - dx)
            r2 += dx * dx
        i_loc = torch.arange(start, stop, device=X.device).view(1, -1, 1)
        j_loc = torch.arange(start, N, device=X.device).view(1, 1, -1)
        b, ci, cj = ((r2 < rl2) & (j_loc > i_loc)).nonzero(as_tuple=True)
        out_b.append(b)
        out_i.append(ci + start)
        out_j.append(cj + start)
    b = torch.cat(out_b)
    i = torch.cat(out_i)
    j = torch.cat(out_j)
    if B > 1:  # row blocks hold every replica: restore the (replica, i, j) order
        order = torch.argsort(b * N * N + i * N + j)
        b, i, j = b[order], i[order], j[order]
    return NeighborPairs(b * N + i, b * N + j, b, B, N)

"""Pair potentials: a generic pair-energy machinery and the usual short-range terms.

Units: reduced Lennard-Jones units (lengths in sigma, energies in epsilon) unless a task
states otherwise.

Every pair term is an :class:`PairPotential`: a function ``u(r; params)`` of the pair
distance, summed over a *pair selection*:

- **dense** (default): all pairs ``i < j`` of each replica, minus ``exclude`` pairs
  (bonded neighbours excluded from WCA, say). ``O(N^2)`` per call; right for small N.
- **fixed pairs**: ``pairs [P, 2]``, e.g. the native contacts of a Go model; parameters may
  then be per-pair tensors ``[P]`` (native distances as per-pair ``sigma``).
- **neighbor list**: a :class:`~controlmd.neighbors.NeighborList` (Verlet list with skin,
  batched over replicas), for large N.

Distances always come from ``space.displacement`` (minimum image in a periodic box); the
cutoff must be at most half the shortest box side, checked at construction.

Cutoffs are wrappers of the bare ``u``: ``shift="energy"`` gives
``u(r) - u(r_c)`` (continuous energy), ``shift="force"`` gives
``u(r) - u(r_c) - (r - r_c) u'(r_c)`` (continuous energy and force), ``shift="none"``
truncates. All are zero beyond ``r_c``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from controlmd._validation import check_choice, check_positions, check_positive
from controlmd.errors import ConfigError, ControlMDError
from controlmd.neighbors import index_pairs
from controlmd.potentials import lj_fused
from controlmd.potentials.base import Potential
from controlmd.space import Space, free

if TYPE_CHECKING:
    from controlmd.neighbors import NeighborList

Tensor = torch.Tensor

__all__ = [
    "WCA",
    "LennardJones",
    "Morse",
    "PairPotential",
    "SoftSphere",
    "lennard_jones",
    "morse",
    "soft_sphere",
]

SHIFTS = ("energy", "force", "none")
_WCA_FACTOR = 2.0 ** (1.0 / 6.0)


# --------------------------------------------------------------------------- bare functions


def lennard_jones(r: Tensor, sigma: Tensor | float = 1.0, epsilon: Tensor | float = 1.0) -> Tensor:
    """``4 epsilon [(sigma/r)^12 - (sigma/r)^6]``; minimum ``-epsilon`` at ``2^(1/6) sigma``."""
    s6 = (sigma / r) ** 6
    return 4.0 * epsilon * (s6 * s6 - s6)


def soft_sphere(
    r: Tensor,
    sigma: Tensor | float = 1.0,
    epsilon: Tensor | float = 1.0,
    alpha: Tensor | float = 2.0,
) -> Tensor:
    """``epsilon / alpha (1 - r/sigma)^alpha`` for ``r < sigma``, else 0 (JAX MD's soft sphere)."""
    x = torch.clamp(1.0 - r / sigma, min=0.0)
    return epsilon / alpha * x**alpha


def morse(
    r: Tensor,
    sigma: Tensor | float = 1.0,
    epsilon: Tensor | float = 1.0,
    alpha: Tensor | float = 5.0,
) -> Tensor:
    """``epsilon [(1 - exp(-alpha (r - sigma)))^2 - 1]``; minimum ``-epsilon`` at ``r = sigma``."""
    e = torch.exp(-alpha * (r - sigma))
    return epsilon * (e * e - 2.0 * e)


# --------------------------------------------------------------------------- parameters


def register_params(
    module: nn.Module,
    values: dict[str, float | Tensor],
    *,
    learnable: bool | Sequence[str],
    positive: Sequence[str],
    n_terms: int | None,
    term_name: str = "pair",
) -> tuple[str, ...]:
    """Register each value as a float64 buffer, or an ``nn.Parameter`` when learnable.

    A value is a scalar or, when ``n_terms`` is given, a tensor ``[n_terms]`` (one per pair,
    bond, ...). Names in ``positive`` must be > 0. Returns the names, in order.
    """
    if isinstance(learnable, bool):
        learn = set(values) if learnable else set()
    else:
        learn = {learnable} if isinstance(learnable, str) else set(learnable)
        unknown = learn - set(values)
        if unknown:
            raise ConfigError(
                f"learnable names unknown parameter(s) {sorted(unknown)}; "
                f"this term has: {', '.join(values)}"
            )
    for name, value in values.items():
        v = torch.as_tensor(value, dtype=torch.float64).detach().clone()
        if v.ndim > 1 or (v.ndim == 1 and (n_terms is None or v.shape[0] != n_terms)):
            allowed = (
                "a scalar"
                if n_terms is None
                else f"a scalar or a tensor of shape [{n_terms}] (one per {term_name})"
            )
            raise ControlMDError(f"{name} must be {allowed}, got shape {tuple(v.shape)}")
        if name in positive:
            check_positive(name, v)
        elif not bool(torch.isfinite(v).all()):
            raise ControlMDError(f"{name} must be finite, got {v.tolist()}")
        if name in learn:
            setattr(module, name, nn.Parameter(v))
        else:
            module.register_buffer(name, v)
    return tuple(values)


def get_params(module: nn.Module, names: Sequence[str], like: Tensor) -> dict[str, Tensor]:
    """The named parameters/buffers cast to ``like``'s dtype (differentiably)."""
    return {name: getattr(module, name).to(like.dtype) for name in names}


# --------------------------------------------------------------------------- pair machinery


@dataclass(frozen=True)
class PairGeometry:
    """Displacements of the selected pairs.

    Attributes:
        disp: ``[B, P, d]`` (dense / fixed pairs) or ``[M, d]`` (neighbor list, flat over replicas).
        replica: ``None`` for the ``[B, P]`` layout, else the replica of each flat pair ``[M]``.
        n_replicas: ``B``.
    """

    disp: Tensor
    replica: Tensor | None
    n_replicas: int

    def scaled(self, lam: Tensor) -> Tensor:
        """Displacements of replica ``b`` multiplied by ``lam[b]`` (``lam``: ``[B]``)."""
        if self.replica is None:
            return self.disp * lam.view(-1, 1, 1)
        return self.disp * lam[self.replica].unsqueeze(-1)

    def reduce(self, u: Tensor) -> Tensor:
        """Per-pair values (``[B, P]`` or ``[M]``) summed per replica -> ``[B]``."""
        if self.replica is None:
            return u.sum(dim=-1)
        out = torch.zeros(self.n_replicas, dtype=u.dtype, device=u.device)
        return out.index_add(0, self.replica, u)


class PairSelection(nn.Module):
    """Which pairs a pair term sums over: dense ``i < j``, fixed ``pairs``, or a neighbor list.

    Args:
        space: the box.
        pairs: fixed pairs ``[P, 2]`` (``i != j``), or ``None``.
        exclude: pairs ``[E, 2]`` removed from the dense selection (order within a pair is
            irrelevant).
        neighbor_list: a :class:`~controlmd.neighbors.NeighborList` (its own ``exclude``
            applies; give exclusions to it).
    """

    def __init__(
        self,
        space: Space,
        *,
        pairs: Tensor | Sequence[Sequence[int]] | None = None,
        exclude: Tensor | Sequence[Sequence[int]] | None = None,
        neighbor_list: NeighborList | None = None,
    ) -> None:
        super().__init__()
        self.space = space
        modes = [x is not None for x in (pairs, neighbor_list)]
        if sum(modes) > 1:
            raise ConfigError("give either pairs or neighbor_list, not both")
        if exclude is not None and (pairs is not None or neighbor_list is not None):
            raise ConfigError(
                "exclude applies to the dense selection only: drop the excluded pairs from "
                "`pairs`, or pass exclude to the NeighborList"
            )
        if neighbor_list is not None and not _same_box(neighbor_list.space, space):
            raise ConfigError(
                "the neighbor list was built for a different box than this term's space"
            )
        self.neighbor_list = neighbor_list
        self.n_pairs: int | None = None
        if pairs is not None:
            p = index_pairs("pairs", pairs)
            self.register_buffer("pairs", p, persistent=False)
            self.n_pairs = p.shape[0]
            self._max_index = int(p.max()) if p.numel() else -1
        else:
            self.pairs = None
        if exclude is not None:
            e = torch.sort(index_pairs("exclude", exclude), dim=1).values
            self.register_buffer("exclude", e, persistent=False)
        else:
            self.exclude = None
        self._dense_cache: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    @property
    def mode(self) -> str:
        if self.neighbor_list is not None:
            return "neighbor_list"
        return "pairs" if self.pairs is not None else "dense"

    def dense_index(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Indices ``(i, j)`` of all pairs ``i < j`` of ``n`` particles, minus exclusions."""
        key = (n, device)
        if key not in self._dense_cache:
            i, j = torch.triu_indices(n, n, offset=1, device=device)
            if self.exclude is not None:
                if int(self.exclude.max()) >= n:
                    raise ControlMDError(
                        f"exclude refers to particle {int(self.exclude.max())} but R has only N = {n}"
                    )
                ex = self.exclude.to(device)
                keep = ~torch.isin(i * n + j, ex[:, 0] * n + ex[:, 1])
                i, j = i[keep], j[keep]
            self._dense_cache[key] = (i, j)
        return self._dense_cache[key]

    def geometry(self, R: Tensor) -> PairGeometry:
        """Displacements ``R_i - R_j`` (minimum image) of the selected pairs."""
        B, N, d = R.shape
        box = self.space.box
        if box is not None and box.shape[0] != d:
            raise ControlMDError(
                f"R has spatial dimension {d} but the box has {box.shape[0]} sides"
            )
        if self.neighbor_list is not None:
            nb = self.neighbor_list.update(R)
            Rf = R.reshape(B * N, d)
            dR = self.space.displacement(Rf.index_select(0, nb.i), Rf.index_select(0, nb.j))
            return PairGeometry(dR, nb.replica, B)
        if self.pairs is not None:
            if self._max_index >= N:
                raise ControlMDError(
                    f"pairs refers to particle {self._max_index} but R has only N = {N} particles"
                )
            i, j = self.pairs[:, 0], self.pairs[:, 1]
        else:
            i, j = self.dense_index(N, R.device)
        return PairGeometry(self.space.displacement(R[:, i], R[:, j]), None, B)


def _same_box(a: Space, b: Space) -> bool:
    if a.box is None or b.box is None:
        return a.box is None and b.box is None
    return a.box.shape == b.box.shape and bool(torch.equal(a.box, b.box))


class PairPotential(Potential):
    """Base class: ``E = sum over selected pairs of u(r_ij)`` with an optional cutoff.

    Subclasses set ``param_names`` via :meth:`_register_params` and implement
    :meth:`pair_energy`.

    Args:
        space: the box (default: free space).
        r_cut: cutoff distance (scalar, or ``[P]`` with fixed ``pairs``), or ``None`` for no
            cutoff (dense and fixed-pair selections only).
        shift: ``"energy"``, ``"force"`` or ``"none"`` (see the module docstring).
        pairs, exclude, neighbor_list: the pair selection (see :class:`PairSelection`).
    """

    def __init__(
        self,
        space: Space | None = None,
        *,
        r_cut: float | Tensor | None,
        shift: str = "energy",
        pairs: Tensor | Sequence[Sequence[int]] | None = None,
        exclude: Tensor | Sequence[Sequence[int]] | None = None,
        neighbor_list: NeighborList | None = None,
    ) -> None:
        super().__init__()
        self.space = space if space is not None else free()
        check_choice("shift", shift, SHIFTS)
        self.shift = shift
        self.param_names: tuple[str, ...] = ()
        self.selection = PairSelection(
            self.space, pairs=pairs, exclude=exclude, neighbor_list=neighbor_list
        )
        if r_cut is None:
            if neighbor_list is not None:
                raise ConfigError("a neighbor-list pair term needs a finite r_cut")
            if self.space.periodic:
                raise ConfigError(
                    "a pair term in a periodic box needs a finite r_cut <= half the box"
                )
            if shift != "none":
                raise ConfigError(f"shift = {shift!r} needs a cutoff; give r_cut or shift='none'")
            self.r_cut = None
        else:
            rc = torch.as_tensor(r_cut, dtype=torch.float64)
            if rc.ndim > 1 or (rc.ndim == 1 and rc.shape[0] != self.selection.n_pairs):
                raise ControlMDError(
                    f"r_cut must be a scalar (or [P] with fixed pairs), got shape {tuple(rc.shape)}"
                )
            check_positive("r_cut", rc)
            self.register_buffer("r_cut", rc, persistent=False)
            self._check_cutoff(float(rc.max()))

    def _check_cutoff(self, r_cut: float) -> None:
        self.space.check_cutoff("r_cut", r_cut)
        nl = self.selection.neighbor_list
        if nl is not None and nl.r_cut < r_cut - 1e-12:
            raise ConfigError(
                f"neighbor_list.r_cut = {nl.r_cut:g} is shorter than this term's r_cut = {r_cut:g}"
            )

    def _register_params(
        self,
        values: dict[str, float | Tensor],
        *,
        learnable: bool | Sequence[str],
        positive: Sequence[str],
    ) -> None:
        self.param_names = register_params(
            self, values, learnable=learnable, positive=positive, n_terms=self.selection.n_pairs
        )

    def _params(self, like: Tensor) -> dict[str, Tensor]:
        return get_params(self, self.param_names, like)

    def pair_energy(self, r: Tensor, **params: Tensor) -> Tensor:
        """Bare ``u(r)``; ``r`` broadcastable against each parameter (scalar or ``[P]``)."""
        raise NotImplementedError

    def cutoff(self, params: dict[str, Tensor], like: Tensor) -> Tensor | None:
        """Cutoff distance (scalar or ``[P]``), possibly a function of the parameters."""
        return None if self.r_cut is None else self.r_cut.to(like.dtype)

    # -- energy ------------------------------------------------------------------------

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        """Energy per replica ``[B]`` (``R``: ``[B, N, d]``; ``t`` ignored)."""
        if R.ndim != 3:
            check_positions("R", R)
        geo = self.selection.geometry(R)
        return geo.reduce(self.pair_energies(geo.disp))

    def pair_energies(self, dR: Tensor) -> Tensor:
        """Cut and shifted ``u`` of each pair from its displacement ``[..., d]`` -> ``[...]``."""
        params = self._params(dR)
        r2 = (dR * dR).sum(dim=-1)
        rc = self.cutoff(params, dR)
        if rc is None:
            return self.pair_energy(torch.sqrt(r2), **params)
        rc2 = rc.detach() ** 2
        inside = ~(r2 >= rc2)  # a NaN distance stays inside: NaN positions give a NaN energy
        # Outside the cutoff evaluate at r_c, so no inf/NaN enters the graph through where().
        r = torch.sqrt(torch.where(inside, r2, rc2))
        u = self.pair_energy(r, **params)
        if self.shift == "force":
            u_c, du_c = self._cutoff_values(rc, params)
            u = u - u_c - (r - rc) * du_c
        elif self.shift != "none":  # u'(r_c) is not needed: no autograd pass for it
            u = u - self.pair_energy(rc, **params)
        return torch.where(inside, u, torch.zeros((), dtype=u.dtype))

    def _cutoff_values(self, rc: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``u(r_c)`` and ``u'(r_c)`` (differentiable in the parameters)."""
        u_c = self.pair_energy(rc, **params)
        with torch.enable_grad():
            rc_leaf = rc.detach().expand_as(u_c).clone().requires_grad_(True)
            u_leaf = self.pair_energy(rc_leaf, **params)
            (du_c,) = torch.autograd.grad(u_leaf.sum(), rc_leaf, create_graph=True)
        return u_c, du_c

    def virial(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        """``W = sum_pairs r_ij . F_ij`` per replica ``[B]`` (for the virial pressure).

        Computed as ``-dE_b/d lambda_b`` at ``lambda = 1`` with the pair displacements of
        replica ``b`` scaled by ``lambda_b``; the graph is kept, so W is differentiable.
        """
        geo = self.selection.geometry(R)
        with torch.enable_grad():
            lam = torch.ones(geo.n_replicas, dtype=R.dtype, device=R.device, requires_grad=True)
            E = geo.reduce(self.pair_energies(geo.scaled(lam)))
            (dE,) = torch.autograd.grad(E.sum(), lam, create_graph=True)
        return -dE


# --------------------------------------------------------------------------- concrete terms


class LennardJones(PairPotential):
    """Lennard-Jones pair potential ``4 epsilon [(sigma/r)^12 - (sigma/r)^6]``.

    Args:
        space: the box.
        sigma: length scale (> 0), scalar or ``[P]`` with fixed pairs.
        epsilon: well depth (> 0), scalar or ``[P]``.
        r_cut: cutoff (default 2.5; ``None`` for none, free space only).
        shift: ``"energy"`` (default), ``"force"`` or ``"none"``.
        learnable: ``True``, or names among ``("sigma", "epsilon")``, to make them
            ``nn.Parameter`` s (e.g. for d loss / d epsilon).
        pairs, exclude, neighbor_list: pair selection.
    """

    def __init__(
        self,
        space: Space | None = None,
        *,
        sigma: float | Tensor = 1.0,
        epsilon: float | Tensor = 1.0,
        r_cut: float | Tensor | None = 2.5,
        shift: str = "energy",
        learnable: bool | Sequence[str] = False,
        pairs: Tensor | Sequence[Sequence[int]] | None = None,
        exclude: Tensor | Sequence[Sequence[int]] | None = None,
        neighbor_list: NeighborList | None = None,
    ) -> None:
        super().__init__(
            space,
            r_cut=r_cut,
            shift=shift,
            pairs=pairs,
            exclude=exclude,
            neighbor_list=neighbor_list,
        )
        self._register_params(
            {"sigma": sigma, "epsilon": epsilon}, learnable=learnable, positive=("sigma", "epsilon")
        )

    def pair_energy(self, r: Tensor, **params: Tensor) -> Tensor:
        return lennard_jones(r, params["sigma"], params["epsilon"])

    def energy_and_forces(
        self, R: Tensor, t: Tensor | float | None = None, *, create_graph: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(E [B], F [B, N, d])`` from the fused analytic kernel
        (:mod:`controlmd.potentials.lj_fused`) for scalar sigma/epsilon/r_cut, with an
        analytic backward under ``create_graph``; autograd otherwise (per-pair parameters,
        subclasses that change the energy)."""
        if R.ndim != 3:
            check_positions("R", R)
        if self.fused_supported() and R.shape[0] > 0:  # the kernel needs >= 1 replica
            return lj_fused.lj_energy_and_forces(self, R, create_graph=create_graph)
        return super().energy_and_forces(R, t, create_graph=create_graph)

    def fused_supported(self) -> bool:
        """Whether the fused kernel applies: scalar sigma, epsilon and r_cut, and the stock
        LJ / WCA energy and cutoff (a subclass that changes either uses autograd)."""
        cls = type(self)
        if cls.pair_energy is not LennardJones.pair_energy:
            return False
        if cls.cutoff not in (LennardJones.cutoff, WCA.cutoff):
            return False
        if self.sigma.ndim or self.epsilon.ndim:
            return False
        return self.r_cut is None or self.r_cut.ndim == 0


class WCA(LennardJones):
    """Weeks–Chandler–Andersen repulsion: LJ cut at ``2^(1/6) sigma`` and shifted up by epsilon.

    ``u = 4 epsilon [(sigma/r)^12 - (sigma/r)^6] + epsilon`` for ``r < 2^(1/6) sigma``, else 0;
    purely repulsive, continuous with continuous force.

    Args:
        space, sigma, epsilon, learnable, pairs, exclude, neighbor_list: as for
            :class:`LennardJones` (the cutoff follows sigma).
    """

    def __init__(
        self,
        space: Space | None = None,
        *,
        sigma: float | Tensor = 1.0,
        epsilon: float | Tensor = 1.0,
        learnable: bool | Sequence[str] = False,
        pairs: Tensor | Sequence[Sequence[int]] | None = None,
        exclude: Tensor | Sequence[Sequence[int]] | None = None,
        neighbor_list: NeighborList | None = None,
    ) -> None:
        rc = _WCA_FACTOR * torch.as_tensor(sigma, dtype=torch.float64)
        super().__init__(
            space,
            sigma=sigma,
            epsilon=epsilon,
            r_cut=rc,
            shift="energy",
            learnable=learnable,
            pairs=pairs,
            exclude=exclude,
            neighbor_list=neighbor_list,
        )

    def cutoff(self, params: dict[str, Tensor], like: Tensor) -> Tensor:
        return _WCA_FACTOR * params["sigma"]


class SoftSphere(PairPotential):
    """Soft-sphere repulsion ``epsilon / alpha (1 - r/sigma)^alpha`` for ``r < sigma`` (JAX MD).

    Zero beyond contact at ``r = sigma``; ``alpha = 2`` is a harmonic overlap penalty,
    ``alpha = 5/2`` Hertzian. The cutoff is ``sigma`` (no shift needed).

    Args:
        space: the box.
        sigma: diameter (> 0), scalar or ``[P]``.
        epsilon: stiffness (> 0).
        alpha: exponent (> 0, default 2).
        learnable, pairs, exclude, neighbor_list: as for :class:`LennardJones`.
    """

    def __init__(
        self,
        space: Space | None = None,
        *,
        sigma: float | Tensor = 1.0,
        epsilon: float | Tensor = 1.0,
        alpha: float | Tensor = 2.0,
        learnable: bool | Sequence[str] = False,
        pairs: Tensor | Sequence[Sequence[int]] | None = None,
        exclude: Tensor | Sequence[Sequence[int]] | None = None,
        neighbor_list: NeighborList | None = None,
    ) -> None:
        rc = torch.as_tensor(sigma, dtype=torch.float64)
        super().__init__(
            space, r_cut=rc, shift="none", pairs=pairs, exclude=exclude, neighbor_list=neighbor_list
        )
        self._register_params(
            {"sigma": sigma, "epsilon": epsilon, "alpha": alpha},
            learnable=learnable,
            positive=("sigma", "epsilon", "alpha"),
        )

    def cutoff(self, params: dict[str, Tensor], like: Tensor) -> Tensor:
        return params["sigma"]

    def pair_energy(self, r: Tensor, **params: Tensor) -> Tensor:
        return soft_sphere(r, params["sigma"], params["epsilon"], params["alpha"])


class Morse(PairPotential):
    """Morse pair potential ``epsilon [(1 - exp(-alpha (r - sigma)))^2 - 1]``.

    Minimum ``-epsilon`` at ``r = sigma``; ``alpha`` sets the range (well width ~ 1/alpha).

    Args:
        space: the box.
        sigma: equilibrium distance (> 0), scalar or ``[P]`` (e.g. native contact distances).
        epsilon: well depth (> 0).
        alpha: inverse range (> 0, default 5).
        r_cut: cutoff (default 2.5; ``None`` for none, free space only).
        shift: ``"energy"`` (default), ``"force"`` or ``"none"``.
        learnable, pairs, exclude, neighbor_list: as for :class:`LennardJones`.
    """

    def __init__(
        self,
        space: Space | None = None,
        *,
        sigma: float | Tensor = 1.0,
        epsilon: float | Tensor = 1.0,
        alpha: float | Tensor = 5.0,
        r_cut: float | Tensor | None = 2.5,
        shift: str = "energy",
        learnable: bool | Sequence[str] = False,
        pairs: Tensor | Sequence[Sequence[int]] | None = None,
        exclude: Tensor | Sequence[Sequence[int]] | None = None,
        neighbor_list: NeighborList | None = None,
    ) -> None:
        super().__init__(
            space,
            r_cut=r_cut,
            shift=shift,
            pairs=pairs,
            exclude=exclude,
            neighbor_list=neighbor_list,
        )
        self._register_params(
            {"sigma": sigma, "epsilon": epsilon, "alpha": alpha},
            learnable=learnable,
            positive=("sigma", "epsilon", "alpha"),
        )

    def pair_energy(self, r: Tensor, **params: Tensor) -> Tensor:
        return morse(r, params["sigma"], params["epsilon"], params["alpha"])

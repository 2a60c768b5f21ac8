"""Bonded terms: harmonic and FENE bonds, harmonic angles, cosine dihedrals.

Units: reduced LJ units (lengths sigma, energies epsilon, angles in radians).

Each term takes an integer index tensor (``bonds [M, 2]``, ``angles [M, 3]``,
``dihedrals [M, 4]``) shared by every replica, and parameters that are scalars or one
value per term ``[M]`` (optionally learnable). Bond vectors come from
``space.displacement``, so chains may cross periodic boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from controlmd._validation import check_positions
from controlmd.errors import ControlMDError
from controlmd.potentials.base import Potential
from controlmd.potentials.pair import get_params, register_params
from controlmd.space import Space, free

Tensor = torch.Tensor

__all__ = ["CosineDihedral", "FENEBond", "HarmonicAngle", "HarmonicBond"]


def _as_index(name: str, index: Tensor | Sequence[Sequence[int]], width: int) -> Tensor:
    t = torch.as_tensor(index)
    if t.numel() == 0:
        t = t.reshape(0, width)
    if t.ndim != 2 or t.shape[1] != width:
        raise ControlMDError(f"{name} must have shape [M, {width}], got {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ControlMDError(f"{name} must hold integer particle indices, got dtype {t.dtype}")
    t = t.long()
    if t.numel() and int(t.min()) < 0:
        raise ControlMDError(
            f"{name} must hold non-negative particle indices, got min {int(t.min())}"
        )
    for a in range(width):
        for b in range(a + 1, width):
            same = t[:, a] == t[:, b]
            if bool(same.any()):
                k = int(same.nonzero()[0])
                raise ControlMDError(f"{name} row {k} = {t[k].tolist()} repeats a particle")
    return t


def _safe_norm(x: Tensor) -> Tensor:
    """``|x|`` over the last axis with a zero (not NaN) gradient at ``x = 0``."""
    s2 = (x * x).sum(dim=-1)
    nz = s2 > 0
    return torch.where(
        nz, torch.sqrt(torch.where(nz, s2, torch.ones_like(s2))), torch.zeros_like(s2)
    )


class _Bonded(Potential):
    """Shared plumbing: index validation, parameters, per-replica sum, virial."""

    width: int = 2
    index_name: str = "bonds"
    index: Tensor  # buffer [M, width]: the particles of each term

    def __init__(self, index: Tensor | Sequence[Sequence[int]], space: Space | None) -> None:
        super().__init__()
        self.space = space if space is not None else free()
        idx = _as_index(self.index_name, index, self.width)
        self.register_buffer("index", idx, persistent=False)
        self._max_index = int(idx.max()) if idx.numel() else -1

    @property
    def n_terms(self) -> int:
        return int(self.index.shape[0])

    def _register(
        self,
        values: dict[str, float | Tensor],
        learnable: bool | Sequence[str],
        positive: Sequence[str],
    ) -> None:
        self.param_names = register_params(
            self,
            values,
            learnable=learnable,
            positive=positive,
            n_terms=self.n_terms,
            term_name=self.index_name[:-1],
        )

    def _vectors(self, R: Tensor) -> list[Tensor]:
        """Consecutive bond vectors ``r_{a+1} - r_a`` of each term, each ``[B, M, d]``."""
        if R.ndim != 3:
            check_positions("R", R)
        if self._max_index >= R.shape[1]:
            raise ControlMDError(
                f"{self.index_name} refers to particle {self._max_index} but R has only N = {R.shape[1]}"
            )
        X = [R[:, self.index[:, a]] for a in range(self.width)]
        return [self.space.displacement(X[a + 1], X[a]) for a in range(self.width - 1)]

    def term_energy(self, vectors: list[Tensor], params: dict[str, Tensor]) -> Tensor:
        """Energy of each term ``[B, M]`` from its bond vectors."""
        raise NotImplementedError

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        """Energy per replica ``[B]`` (``t`` ignored)."""
        vecs = self._vectors(R)
        return self.term_energy(vecs, get_params(self, self.param_names, R)).sum(dim=-1)

    def virial(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        """``W = sum r . F`` per replica ``[B]`` (``-dE/d lambda`` with bond vectors scaled)."""
        vecs = self._vectors(R)
        with torch.enable_grad():
            lam = torch.ones(R.shape[0], dtype=R.dtype, device=R.device, requires_grad=True)
            scaled = [v * lam.view(-1, 1, 1) for v in vecs]
            E = self.term_energy(scaled, get_params(self, self.param_names, R)).sum(dim=-1)
            (dE,) = torch.autograd.grad(E.sum(), lam, create_graph=True, allow_unused=True)
        return -dE if dE is not None else torch.zeros(R.shape[0], dtype=R.dtype, device=R.device)


class HarmonicBond(_Bonded):
    """Harmonic bonds ``E = k/2 (r - r0)^2``.

    Args:
        bonds: particle pairs ``[M, 2]``.
        k: stiffness (> 0), scalar or ``[M]``, energy / length^2.
        r0: rest length (> 0), scalar or ``[M]``.
        space: the box (default: free space).
        learnable: ``True`` or names among ``("k", "r0")``.
    """

    def __init__(
        self,
        bonds: Tensor | Sequence[Sequence[int]],
        *,
        k: float | Tensor = 100.0,
        r0: float | Tensor = 1.0,
        space: Space | None = None,
        learnable: bool | Sequence[str] = False,
    ) -> None:
        super().__init__(bonds, space)
        self._register({"k": k, "r0": r0}, learnable, positive=("k", "r0"))

    def term_energy(self, vectors: list[Tensor], params: dict[str, Tensor]) -> Tensor:
        r = _safe_norm(vectors[0])
        return 0.5 * params["k"] * (r - params["r0"]) ** 2


class FENEBond(_Bonded):
    """FENE bonds ``E = -k R0^2 / 2 ln(1 - (r / R0)^2)`` (Kremer–Grest: k = 30, R0 = 1.5).

    A bond stretched to ``r >= R0`` has no finite energy: the energy and forces become
    non-finite (``inf`` at ``r = R0``, ``NaN`` beyond) rather than being clamped, so a
    trajectory that breaks a bond stops at the divergence check of ``simulate`` (naming the
    step); :meth:`stretched` and
    :func:`~controlmd.potentials.validate_configuration` name the bond.

    Args:
        bonds: particle pairs ``[M, 2]``.
        k: stiffness (> 0), scalar or ``[M]``, energy / length^2.
        R0: maximum extension (> 0), scalar or ``[M]``.
        space: the box (default: free space).
        learnable: ``True`` or names among ``("k", "R0")``.
    """

    R0: Tensor  # buffer or nn.Parameter (see register_params), [] or [M]

    def __init__(
        self,
        bonds: Tensor | Sequence[Sequence[int]],
        *,
        k: float | Tensor = 30.0,
        R0: float | Tensor = 1.5,
        space: Space | None = None,
        learnable: bool | Sequence[str] = False,
    ) -> None:
        super().__init__(bonds, space)
        self._register({"k": k, "R0": R0}, learnable, positive=("k", "R0"))

    def term_energy(self, vectors: list[Tensor], params: dict[str, Tensor]) -> Tensor:
        x = (vectors[0] * vectors[0]).sum(dim=-1) / params["R0"] ** 2
        # log(sqrt(1 - x)) rather than log(1 - x) / 2: beyond R0 the sqrt makes the forces
        # NaN too (autograd of log alone would return finite, meaningless forces there).
        return -params["k"] * params["R0"] ** 2 * torch.log(torch.sqrt(1.0 - x))

    def stretched(self, R: Tensor) -> list[tuple[int, int, float]]:
        """Bonds with ``r >= R0``: ``(replica, bond index, r)`` for each."""
        with torch.no_grad():
            r = _safe_norm(self._vectors(R.detach())[0])
            bad = r >= self.R0.to(r.dtype)
            return [(int(b), int(m), float(r[b, m])) for b, m in bad.nonzero().tolist()]

    def diagnose(self, R: Tensor) -> str | None:
        """A message naming the first over-stretched bond, or ``None``."""
        bad = self.stretched(R)
        if not bad:
            return None
        b, m, r = bad[0]
        i, j = self.index[m].tolist()
        R0 = float(self.R0.reshape(-1)[m if self.R0.ndim else 0])
        return (
            f"FENE bond {m} (particles {i}-{j}) of replica {b} is stretched to r = {r:.6g} >= "
            f"R0 = {R0:g} ({len(bad)} such bond(s)); FENE has no finite energy there"
        )


class HarmonicAngle(_Bonded):
    """Harmonic angles ``E = k/2 (theta - theta0)^2``, theta the angle at the middle particle.

    ``theta = atan2(|a x b|, a . b)`` with ``a = r_i - r_j``, ``b = r_k - r_j``, in
    ``[0, pi]``; at an exactly collinear triplet the (undefined) gradient is taken as 0.

    Args:
        angles: particle triplets ``[M, 3]`` (vertex in the middle).
        k: stiffness (> 0), scalar or ``[M]``, energy / rad^2.
        theta0: rest angle in radians, scalar or ``[M]``.
        space: the box (default: free space).
        learnable: ``True`` or names among ``("k", "theta0")``.
    """

    width = 3
    index_name = "angles"

    def __init__(
        self,
        angles: Tensor | Sequence[Sequence[int]],
        *,
        k: float | Tensor = 10.0,
        theta0: float | Tensor = torch.pi,
        space: Space | None = None,
        learnable: bool | Sequence[str] = False,
    ) -> None:
        super().__init__(angles, space)
        self._register({"k": k, "theta0": theta0}, learnable, positive=("k",))

    def term_energy(self, vectors: list[Tensor], params: dict[str, Tensor]) -> Tensor:
        theta = bond_angle(-vectors[0], vectors[1])
        return 0.5 * params["k"] * (theta - params["theta0"]) ** 2

    def virial(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        """Zero: angles are invariant under uniform scaling."""
        return torch.zeros(R.shape[0], dtype=R.dtype, device=R.device)


class CosineDihedral(_Bonded):
    """Periodic dihedrals ``E = k (1 + cos(n phi - phi0))``.

    ``phi`` (radians, in ``(-pi, pi]``) is the IUPAC torsion of ``i-j-k-l``: 0 for cis,
    ``pi`` for trans, positive for a clockwise rotation of the far bond seen along j->k.
    3-D only.

    Args:
        dihedrals: particle quadruplets ``[M, 4]``.
        k: barrier scale (> 0), scalar or ``[M]``, energy.
        n: multiplicity (positive integer), scalar or ``[M]``.
        phi0: phase in radians, scalar or ``[M]``.
        space: the box (default: free space).
        learnable: ``True`` or names among ``("k", "phi0")``.
    """

    width = 4
    index_name = "dihedrals"

    def __init__(
        self,
        dihedrals: Tensor | Sequence[Sequence[int]],
        *,
        k: float | Tensor = 1.0,
        n: int | Tensor = 1,
        phi0: float | Tensor = 0.0,
        space: Space | None = None,
        learnable: bool | Sequence[str] = False,
    ) -> None:
        super().__init__(dihedrals, space)
        n_t = torch.as_tensor(n)
        if n_t.is_floating_point() and not bool((n_t == torch.round(n_t)).all()):
            raise ControlMDError(f"n (multiplicity) must be a positive integer, got {n_t.tolist()}")
        if bool((n_t < 1).any()):
            raise ControlMDError(f"n (multiplicity) must be >= 1, got {n_t.tolist()}")
        if isinstance(learnable, bool) and learnable:
            learnable = ("k", "phi0")
        if not isinstance(learnable, bool) and "n" in learnable:
            raise ControlMDError("the multiplicity n is an integer and cannot be learnable")
        self._register({"k": k, "n": n_t.double(), "phi0": phi0}, learnable, positive=("k",))

    def term_energy(self, vectors: list[Tensor], params: dict[str, Tensor]) -> Tensor:
        phi = dihedral_angle(*vectors)
        return params["k"] * (1.0 + torch.cos(params["n"] * phi - params["phi0"]))

    def virial(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        """Zero: torsions are invariant under uniform scaling."""
        return torch.zeros(R.shape[0], dtype=R.dtype, device=R.device)


def bond_angle(a: Tensor, b: Tensor) -> Tensor:
    """Angle between vectors ``a`` and ``b`` ``[..., d]`` (d = 2 or 3), in ``[0, pi]``."""
    if a.shape[-1] == 2:
        cross = (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]).unsqueeze(-1)
    elif a.shape[-1] == 3:
        cross = torch.linalg.cross(a, b, dim=-1)
    else:
        raise ControlMDError(f"angles need d = 2 or 3, got d = {a.shape[-1]}")
    return torch.atan2(_safe_norm(cross), (a * b).sum(dim=-1))


def dihedral_angle(b1: Tensor, b2: Tensor, b3: Tensor) -> Tensor:
    """IUPAC torsion from consecutive bond vectors ``[..., 3]`` (0 = cis, pi = trans)."""
    if b1.shape[-1] != 3:
        raise ControlMDError(f"dihedrals need d = 3, got d = {b1.shape[-1]}")
    # Blondel & Karplus, J. Comput. Chem. 17, 1132 (1996).
    n1 = torch.linalg.cross(b1, b2, dim=-1)
    n2 = torch.linalg.cross(b2, b3, dim=-1)
    x = (n1 * n2).sum(dim=-1)
    y = _safe_norm(b2) * (b1 * n2).sum(dim=-1)
    # atan2(0, 0) has a NaN gradient; collinear bonds (undefined torsion) get a zero gradient.
    degenerate = (x == 0) & (y == 0)
    return torch.atan2(
        torch.where(degenerate, torch.zeros_like(y), y),
        torch.where(degenerate, torch.ones_like(x), x),
    )

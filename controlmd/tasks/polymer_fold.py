"""Folding a Go-like bead chain into a target structure under time-dependent control.

System
    One chain of ``N`` beads (mass 1) per replica, in free space, ``R`` ``[B, N, 3]``.
    H0 is a Go-like model of the target (its native structure ``R*``):

    * harmonic bonds ``k_bond/2 (r - b*)^2`` at the native bond lengths ``b*``;
    * harmonic angles ``k_angle/2 (theta - theta*)^2`` toward the native angles;
    * dihedrals ``k_dihedral [1 - cos(phi - phi*)] + k_dihedral3 [1 - cos 3(phi - phi*)]``
      toward the native torsions (the only term that tells the target from its mirror
      image);
    * native contacts (pairs ``|i - j| >= 3`` closer than 2.2 sigma in ``R*``): Morse wells
      ``eps_contact [(1 - exp(-contact_alpha (r - d*)))^2 - 1]`` with their minimum at the
      native distance ``d*`` (no cutoff: free space, exponential decay);
    * WCA repulsion (``sigma_repulsive``, epsilon 1) between all pairs ``|i - j| >= 2``;
    * an optional weak non-native attraction (trap maker): Lennard-Jones
      ``eps_nonnative`` (sigma 1, no cutoff) between non-native pairs
      ``|i - j| >= 3``.

    Dynamics: Langevin BAOAB (:class:`~controlmd.dynamics.langevin.Langevin`), collision
    rate ``gamma``, bath temperature ``kT`` (or the temperature channel), time step ``dt``,
    horizon ``T = n_steps dt`` (default 2000 x 0.02 = 40 tau).

Targets
    ``"helix"``: the paper's 22-bead helix (:func:`controlmd.structures.helix`: radius
    0.97 and rise 0.166 per bead over 5 half-turns, scaled to bond length 0.97); its 42
    native contacts join beads one turn apart (``|i - j| = 7, 8, 9``).
    ``"hairpin"``: a 22-bead beta-hairpin (:func:`controlmd.structures.hairpin`: two
    10-bead zigzag strands 1.68 sigma apart joined by a 2-bead turn, bond length 0.97,
    bond angle 120 deg); 30 native contacts across the strands.

Control channels (``controls``, in the order given; any combination)
    ===========  ========================================  ==============  ==============  =======
    name         coupling                                  min             max             unit
    ===========  ========================================  ==============  ==============  =======
    temperature  bath kT(t) of the Langevin thermostat     ``kT_min``      ``kT_max``      epsilon
    epsilon      scale of every attraction (native Morse   ``eps_min``     ``eps_max``     1
                 wells and non-native LJ): eps(t) H_attr
    tweezers     one channel per bead pair ``(i, j)`` of   ``-force_max``  ``force_max``   eps/sig
                 ``tweezer_pairs``: force f(t) pulling j
                 along +x and i along -x (lab frame)
    bias         ``n_bias`` channels u_m(t): learned pair  ``-bias_max``   ``bias_max``    epsilon
                 bias ``sum_m u_m(t) sum_p g_m(r_p)`` with
                 Gaussians ``g_m`` (centres ``bias_centers``,
                 width ``bias_width``) over ``bias_pairs``
    torsion      ``torsion_channels`` amplitudes a(t) of   0               ``torsion_max`` epsilon
                 the native-torsion bias
                 ``sum_k a_k(t) [1 - cos(phi_k - phi*_k)]``
                 (one amplitude for every torsion, or one
                 per torsion: ``torsion_channels = "each"``)
    field        a neural field ``V_theta(x - x_com, t)``  ``-field_max``  ``field_max``   epsilon
                 felt by every bead, ``sum_i V(r_i -       (of V)          (of V)
                 r_com, t)`` (no u(t) channel: the
                 network lives in a ``neural_field``
                 protocol; 3-D Cartesian features
                 relative to the chain's centre of mass)
    ===========  ========================================  ==============  ==============  =======

    The bias acts on all pairs ``|i - j| >= 3`` (``bias_pairs = "all"``, no knowledge of
    the target) or on the native pairs only (``"native"``); a ``fluence_weight`` in
    ``[protocol]`` adds the penalty ``w * integral |u|^2 dt`` so that it cannot simply
    restrain every pair to its native distance.

    The ``epsilon``, ``bias = "native"`` and ``torsion`` channels are native-informed: they
    are built from the target structure (native contacts, native torsions), as the Go model
    itself is. No channel is keyed to a bead's index along the chain except the tweezer
    pairs, which the user names.

    The ``field`` channel is native-blind and index-blind: ``V`` sees only a bead's position
    relative to the chain's centre of mass and the time (``[protocol] kind =
    "neural_field"`` with ``field_dim = 3``, ``field_features = "cartesian"``,
    ``field_com_relative = true``, ``field_species = 1``; anything else is refused, naming
    the key). As the field moves with the chain, its forces sum to zero: it shapes the
    chain but cannot push it as a whole. ``max_field`` is ``field_max``; a release window
    (``[protocol] release_fraction = f``) makes the field exactly zero from ``T (1 - f)`` on.
    Field cost: with the field the final state carries ``aux["field_cost"]`` ``[B]`` =
    ``integral mean_i |F_i(t)|^2 dt`` of the field's force (epsilon^2 tau / sigma^2;
    trapezoid over frames every ``field_cost_every`` steps, plus the last step),
    differentiable; ``[protocol] field_cost_weight`` adds ``w * mean_b field_cost`` to the
    loss, and evaluation reports its mean.

Observation (feedback protocols, gymnasium env)
    =====  =============================  ========  =====
    index  quantity                       range     unit
    =====  =============================  ========  =====
    0      exact native-contact fraction  [0, 1]    1
    1      Kabsch RMSD to the target      [0, 10]   sigma
    2      radius of gyration             [0, 10]   sigma
    =====  =============================  ========  =====

Outcome
    Exact metric (reported): folded fraction. A replica is folded at ``T`` when its exact
    ``Q >= q_folded`` (0.8; a contact is formed when ``|r - d*| < 0.2 d*``) AND its
    Kabsch RMSD (proper rotations only, so the mirror image is not folded) to ``R*`` is
    below ``rmsd_folded`` (1.0 sigma). Surrogate loss (minimized):
    ``mean_b [1 - Q_smooth + w_dihedral * D]``, with ``Q_smooth`` the logistic contact
    fraction of :func:`~controlmd.observables.native_contact_fraction` (sharpness
    ``q_sharpness``) and ``D = mean_k (1 - cos(phi_k - phi*_k)) / 2`` the torsion misfit in
    [0, 1]. Q alone is blind to mirror images (they have the native distances); D is not,
    and unlike the RMSD it needs no SVD in the backward pass.

Starting state
    Random coils: self-avoiding walks with the native bond lengths and angles and uniform
    random torsions (beads kept >= 1 sigma apart, native-contact pairs >= 0.85 of their
    native distance, inside which their Morse wells are steep walls), momenta from
    Maxwell-Boltzmann at ``kT``; replica ``i`` draws from ``replica_seed(seed,
    first_replica + i)``.

Episode end
    Truncation at ``T`` (``n_steps`` steps); no termination.

Units
    Reduced LJ units: length sigma, energy epsilon (kT in epsilon), mass m, time
    tau = sigma sqrt(m / epsilon), force epsilon / sigma.

Arguments
    =================  =========  =================  =====================================
    name               type       default            effect
    =================  =========  =================  =====================================
    target             str        "helix"            "helix" or "hairpin"
    n_beads            int        (target's)         chain length; must equal the target's
    controls           list[str]  ["temperature"]    channels, see above
    kT                 float      0.5                bath kT when not controlled
    kT_min, kT_max     float      0.1, 1.2           temperature channel bounds
    eps_min, eps_max   float      0.25, 2.0          epsilon channel bounds
    force_max          float      5.0                tweezer bound
    tweezer_pairs      list       [[0, -1]]          pulled bead pairs (negative: from end)
    n_bias             int        6                  bias channels (Gaussians)
    bias_centers       list       linspace(1.2, 3.2) Gaussian centres (n_bias values)
    bias_width         float      0.25               Gaussian width (sigma)
    bias_max           float      0.5                bias amplitude bound per pair
    bias_pairs         str        "all"              "all" (|i-j| >= 3) or "native"
    torsion_max        float      5.0                torsion amplitude bound (eps)
    torsion_channels   str        "one"              "one" amplitude or "each" torsion
    gamma              float      0.5                Langevin collision rate (1/tau)
    dt                 float      0.02               time step (tau)
    n_steps            int        2000               steps per episode
    k_bond             float      100.0              bond stiffness (eps/sig^2)
    k_angle            float      20.0               angle stiffness (eps/rad^2)
    k_dihedral         float      1.0                torsion term, multiplicity 1 (eps)
    k_dihedral3        float      0.5                torsion term, multiplicity 3 (eps)
    eps_contact        float      1.0                native well depth (eps)
    contact_alpha      float      4.0                Morse inverse width (1/sigma)
    eps_nonnative      float      0.0                non-native LJ attraction (eps)
    sigma_repulsive    float      1.0                WCA diameter (sigma)
    q_folded           float      0.8                folded: Q >= this
    rmsd_folded        float      1.0                folded: RMSD < this (sigma)
    contact_tolerance  float      0.2                contact formed: |r - d*| < tol d*
    q_sharpness        float      10.0               surrogate Q sharpness
    w_dihedral         float      1.0                surrogate torsion weight
    field_cost_every   int        10                 steps between field-cost frames
    =================  =========  =================  =====================================

Version history
    v0: initial version.
    v1: the torsion channel.
    v2: the field channel and its field cost (defaults and the other channels unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from controlmd._validation import check_choice, check_int, check_positive
from controlmd.dynamics.base import Integrator, State
from controlmd.dynamics.langevin import Langevin
from controlmd.errors import ControlMDError
from controlmd.observables import native_contact_fraction, native_contacts, radius_of_gyration
from controlmd.potentials.base import Potential
from controlmd.potentials.bonded import (
    CosineDihedral,
    HarmonicAngle,
    HarmonicBond,
    bond_angle,
    dihedral_angle,
)
from controlmd.potentials.external import ConstantForce, ExternalField, ScaledPotential
from controlmd.potentials.pair import WCA, LennardJones, Morse
from controlmd.protocols import Protocol
from controlmd.rng import ReplicaRNG
from controlmd.space import free
from controlmd.structures import hairpin, helix, kabsch_align, kabsch_rmsd
from controlmd.tasks._artifacts import ChannelSchedule, check_controls, panel_grid
from controlmd.tasks._field_channel import FieldChannelTask
from controlmd.tasks.base import ControlChannels, TaskCapabilities
from controlmd.tasks.registry import register_task

Tensor = torch.Tensor

__all__ = ["OneGraph", "PairBias", "PolymerFold", "TorsionBias", "random_coil"]

TARGETS = ("helix", "hairpin")
CHANNELS = ("temperature", "epsilon", "tweezers", "bias", "torsion", "field")


class _Select(nn.Module):
    """Channels ``index`` of a protocol: ``u(t)[..., index]`` (``[k']`` or ``[B, k']``)."""

    index: Tensor  # buffer [k'] of channel indices

    def __init__(self, protocol: Protocol, index: Sequence[int]) -> None:
        super().__init__()
        self.protocol = protocol
        self.register_buffer(
            "index", torch.as_tensor(list(index), dtype=torch.long), persistent=False
        )

    def forward(self, t: Tensor) -> Tensor:
        u: Tensor = self.protocol(t)
        return u[..., self.index]


class OneGraph(Potential):
    """A sum of terms whose forces come from one autograd pass over the total energy.

    :class:`~controlmd.potentials.base.SumPotential` differentiates each term on its own
    (so terms with analytic forces can use them); for a chain of many small autograd-only
    terms one pass is several times cheaper. Energies and forces are identical.
    """

    def __init__(self, potential: Potential) -> None:
        super().__init__()
        self.inner = potential

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        return self.inner.energy(R, t)


class PairBias(nn.Module):
    """Coupling of the learned pair bias: ``E_b = sum_m u_m sum_p exp(-(r_p - c_m)^2 / 2 w^2)``.

    Args:
        pairs: biased pairs ``[P, 2]``.
        centers: Gaussian centres ``[M]`` (sigma).
        width: Gaussian width ``w`` (sigma).

    ``forward(R [B, N, d], u [M] or [B, M]) -> [B]`` (energy per replica, epsilon).
    """

    pairs: Tensor  # buffer [P, 2] (long)
    centers: Tensor  # buffer [M] (sigma)

    def __init__(self, pairs: Tensor, centers: Tensor, width: float) -> None:
        super().__init__()
        self.register_buffer("pairs", pairs.long(), persistent=False)
        self.register_buffer("centers", centers.to(torch.float64), persistent=False)
        self.width = float(width)

    def features(self, R: Tensor) -> Tensor:
        """``sum_p g_m(r_p)`` ``[B, M]``."""
        dR = R[:, self.pairs[:, 0]] - R[:, self.pairs[:, 1]]
        r = torch.sqrt((dR * dR).sum(-1))  # [B, P]
        z = (r[..., None] - self.centers.to(R)) / self.width
        return torch.exp(-0.5 * z * z).sum(-2)

    def forward(self, R: Tensor, u: Tensor) -> Tensor:
        return (self.features(R) * u.to(R)).sum(-1)


def _torsion_angles(R: Tensor, dihedrals: Tensor) -> Tensor:
    """Torsions ``[B, K]`` (rad, IUPAC) of the bead quadruples ``dihedrals`` ``[K, 4]`` in
    chains ``R`` ``[B, N, 3]``."""
    X = [R[:, dihedrals[:, a]] for a in range(4)]
    return dihedral_angle(X[1] - X[0], X[2] - X[1], X[3] - X[2])


class TorsionBias(nn.Module):
    """Coupling of the native-torsion bias: ``E_b = sum_k a_k [1 - cos(phi_k - phi*_k)]``.

    Args:
        dihedrals: bead quadruples ``[K, 4]`` of the torsions.
        phi0: native torsions ``[K]`` (rad).

    ``forward(R [B, N, 3], a [M] or [B, M]) -> [B]`` (epsilon), with ``M = 1`` (one
    amplitude for every torsion) or ``M = K`` (one per torsion).
    """

    dihedrals: Tensor  # buffer [K, 4] (long)
    phi0: Tensor  # buffer [K] (rad)

    def __init__(self, dihedrals: Tensor, phi0: Tensor) -> None:
        super().__init__()
        self.register_buffer("dihedrals", dihedrals.long(), persistent=False)
        self.register_buffer("phi0", phi0.to(torch.float64), persistent=False)

    def misfit(self, R: Tensor) -> Tensor:
        """``1 - cos(phi_k - phi*_k)`` per torsion ``[B, K]`` (0 native, 2 flipped)."""
        return 1.0 - torch.cos(_torsion_angles(R, self.dihedrals) - self.phi0.to(R))

    def forward(self, R: Tensor, a: Tensor) -> Tensor:
        m = self.misfit(R)
        a = a.to(R)
        if a.shape[-1] == 1:
            return a[..., 0] * m.sum(-1)
        return (m * a).sum(-1)


def random_coil(
    target: Tensor,
    rng: ReplicaRNG,
    *,
    min_distance: float = 1.0,
    contacts: Tensor | None = None,
    d_native: Tensor | None = None,
    native_fraction: float = 0.85,
    max_tries: int = 200,
) -> Tensor:
    """Self-avoiding random walks with the target's bond lengths and angles and uniform
    random torsions, one per replica of ``rng``.

    Non-bonded beads stay at least ``min_distance`` apart, and native-contact pairs
    (``contacts`` ``[C, 2]`` with native distances ``d_native``) at least
    ``native_fraction * d_native``: the Morse well of a native pair rises steeply inside
    its native distance (about 4000 epsilon/sigma at 0.6 d* for alpha = 4), and a coil
    that starts there would be blown apart in the first steps. Each replica uses only its
    own generator (independent of the batch size); a walk that cannot place a bead after
    ``max_tries`` proposals restarts.

    :param target: native positions ``[N, 3]``.
    :return: positions ``[B, N, 3]`` float64, centred at the origin.
    """
    n = target.shape[0]
    bonds = (target[1:] - target[:-1]).norm(dim=-1).tolist()
    angles = (
        bond_angle(target[:-2] - target[1:-1], target[2:] - target[1:-1]).tolist() if n > 2 else []
    )
    min_sq = [[min_distance**2] * n for _ in range(n)]
    if contacts is not None and d_native is not None:
        for (i, j), d in zip(contacts.tolist(), d_native.tolist()):
            m = max(min_distance, native_fraction * d) ** 2
            min_sq[i][j] = min_sq[j][i] = m
    chains = [_one_coil(n, bonds, angles, g, min_sq, max_tries) for g in rng.generators]
    R = torch.tensor(chains, dtype=torch.float64)
    return R - R.mean(dim=1, keepdim=True)


def _one_coil(
    n: int,
    bonds: list[float],
    angles: list[float],
    g: torch.Generator,
    min_sq: list[list[float]],
    max_tries: int,
) -> list[list[float]]:
    while True:
        pts = [[0.0, 0.0, 0.0], [bonds[0], 0.0, 0.0]] if n > 1 else [[0.0, 0.0, 0.0]]
        ok = True
        for k in range(2, n):
            a, b = pts[k - 2], pts[k - 1]
            u = [b[i] - a[i] for i in range(3)]
            nu = math.sqrt(sum(x * x for x in u))
            u = [x / nu for x in u]
            theta = angles[k - 2]
            for _ in range(max_tries):
                v = torch.randn(3, generator=g, dtype=torch.float64).tolist()
                dot = sum(v[i] * u[i] for i in range(3))
                v = [v[i] - dot * u[i] for i in range(3)]
                nv = math.sqrt(sum(x * x for x in v))
                if nv < 1e-8:
                    continue
                v = [x / nv for x in v]
                # new bond direction at bond angle theta to the previous bond
                c, s = -math.cos(theta), math.sin(theta)
                p = [b[i] + bonds[k - 1] * (c * u[i] + s * v[i]) for i in range(3)]
                if all(
                    sum((p[i] - q[i]) ** 2 for i in range(3)) > min_sq[k][m]
                    for m, q in enumerate(pts[: k - 1])
                ):
                    pts.append(p)
                    break
            else:
                ok = False
                break
        if ok:
            return pts


@register_task
class PolymerFold(FieldChannelTask):
    """Fold a Go-like chain into its target (helix or hairpin); see the module docstring.

    Example:
        >>> task = PolymerFold(n_steps=10)
        >>> task.controls.names, task.n_contacts
        (('kT',), 42)
        >>> from controlmd.protocols import PiecewiseConstant
        >>> u = PiecewiseConstant(t_final=task.horizon, n_pieces=2, low=0.1, high=1.2, init=0.5)
        >>> final = task.rollout(u, 4, seed=0, gradient="none")
        >>> task.metric(final).shape
        torch.Size([4])
    """

    name = "polymer_fold"
    metric_name = "folded_fraction"
    higher_is_better = True
    units = "reduced LJ units: length sigma, energy epsilon (kT in epsilon), mass m, time tau = sigma sqrt(m/epsilon)"
    capabilities = TaskCapabilities(estimators=("pathwise", "score", "forward"))
    field_system = "the polymer_fold beads"
    field_region = "the polymer_fold chain"

    def __init__(
        self,
        *,
        target: str = "helix",
        n_beads: int | None = None,
        controls: Sequence[str] = ("temperature",),
        kT: float = 0.5,
        kT_min: float = 0.1,
        kT_max: float = 1.2,
        eps_min: float = 0.25,
        eps_max: float = 2.0,
        force_max: float = 5.0,
        tweezer_pairs: Sequence[Sequence[int]] = ((0, -1),),
        n_bias: int = 6,
        bias_centers: Sequence[float] | None = None,
        bias_width: float = 0.25,
        bias_max: float = 0.5,
        bias_pairs: str = "all",
        torsion_max: float = 5.0,
        torsion_channels: str = "one",
        gamma: float = 0.5,
        dt: float = 0.02,
        n_steps: int = 2000,
        k_bond: float = 100.0,
        k_angle: float = 20.0,
        k_dihedral: float = 1.0,
        k_dihedral3: float = 0.5,
        eps_contact: float = 1.0,
        contact_alpha: float = 4.0,
        eps_nonnative: float = 0.0,
        sigma_repulsive: float = 1.0,
        q_folded: float = 0.8,
        rmsd_folded: float = 1.0,
        contact_tolerance: float = 0.2,
        q_sharpness: float = 10.0,
        w_dihedral: float = 1.0,
        field_cost_every: int = 10,
    ) -> None:
        check_choice("target", target, TARGETS)
        R_native = helix() if target == "helix" else hairpin()
        n = R_native.shape[0]
        if n_beads is not None:
            check_int("n_beads", n_beads, minimum=4)
            if n_beads != n:
                raise ControlMDError(
                    f"n_beads = {n_beads} does not match the target {target!r}, which has {n} beads"
                )
        check_controls(controls, CHANNELS)
        for name, value in (
            ("kT", kT),
            ("kT_min", kT_min),
            ("kT_max", kT_max),
            ("eps_min", eps_min),
            ("eps_max", eps_max),
            ("force_max", force_max),
            ("bias_width", bias_width),
            ("bias_max", bias_max),
            ("torsion_max", torsion_max),
            ("gamma", gamma),
            ("dt", dt),
            ("k_bond", k_bond),
            ("k_angle", k_angle),
            ("k_dihedral", k_dihedral),
            ("k_dihedral3", k_dihedral3),
            ("eps_contact", eps_contact),
            ("contact_alpha", contact_alpha),
            ("sigma_repulsive", sigma_repulsive),
            ("rmsd_folded", rmsd_folded),
            ("contact_tolerance", contact_tolerance),
            ("q_sharpness", q_sharpness),
        ):
            check_positive(name, value)
        check_positive("eps_nonnative", eps_nonnative, allow_zero=True)
        check_positive("w_dihedral", w_dihedral, allow_zero=True)
        if not kT_min < kT_max:
            raise ControlMDError(f"kT bounds need kT_min < kT_max, got [{kT_min}, {kT_max}]")
        if not eps_min < eps_max:
            raise ControlMDError(
                f"epsilon bounds need eps_min < eps_max, got [{eps_min}, {eps_max}]"
            )
        if not 0.0 < q_folded <= 1.0:
            raise ControlMDError(f"q_folded must be in (0, 1], got {q_folded}")
        check_int("n_steps", n_steps)
        check_int("field_cost_every", field_cost_every)
        check_choice("bias_pairs", bias_pairs, ["all", "native"])
        check_choice("torsion_channels", torsion_channels, ["one", "each"])

        self.target_name = target
        self.target = R_native
        self.n_beads = n
        self.kT = float(kT)
        self.gamma = float(gamma)
        self.dt = float(dt)
        self.n_steps = n_steps
        self.field_cost_every = field_cost_every
        self.space = free()
        self.spatial_dim = int(R_native.shape[-1])
        self.q_folded = float(q_folded)
        self.rmsd_folded = float(rmsd_folded)
        self.contact_tolerance = float(contact_tolerance)
        self.q_sharpness = float(q_sharpness)
        self.w_dihedral = float(w_dihedral)
        self.eps_contact = float(eps_contact)
        self.eps_nonnative = float(eps_nonnative)
        self.contacts, self.d_native = native_contacts(R_native, cutoff=2.2, min_separation=3)
        self.n_contacts = int(self.contacts.shape[0])

        # Native geometry of the bonded terms.
        idx = torch.arange(n)
        self._bonds = torch.stack([idx[:-1], idx[1:]], dim=1)
        self._angles = torch.stack([idx[:-2], idx[1:-1], idx[2:]], dim=1)
        self._dihedrals = torch.stack([idx[:-3], idx[1:-2], idx[2:-1], idx[3:]], dim=1)
        self._b0 = (R_native[1:] - R_native[:-1]).norm(dim=-1)
        self._theta0 = bond_angle(R_native[:-2] - R_native[1:-1], R_native[2:] - R_native[1:-1])
        self._phi0 = self.torsion_angles(R_native[None])[0]
        self._torsion_bias = TorsionBias(self._dihedrals, self._phi0)
        self.k_bond, self.k_angle = float(k_bond), float(k_angle)
        self.k_dihedral, self.k_dihedral3 = float(k_dihedral), float(k_dihedral3)
        self.contact_alpha = float(contact_alpha)
        self.sigma_repulsive = float(sigma_repulsive)

        # Control channels.
        self.channel_kinds = tuple(controls)
        names: list[str] = []
        low: list[float] = []
        high: list[float] = []
        units: list[str] = []
        self._slots: dict[str, list[int]] = {}
        pulls = [tuple(p) for p in tweezer_pairs]
        for p in pulls:
            if len(p) != 2:
                raise ControlMDError(
                    f"tweezer_pairs entries must be bead pairs [i, j], got {list(p)}"
                )
            for b in p:
                if not -n <= int(b) < n:
                    raise ControlMDError(
                        f"tweezer_pairs bead index {b} is out of range for {n} beads"
                    )
        self.tweezer_pairs = [(int(i) % n, int(j) % n) for i, j in pulls]
        if bias_centers is None:
            centers = (
                torch.linspace(1.2, 3.2, n_bias, dtype=torch.float64)
                if n_bias > 1
                else torch.tensor([2.0])
            )
        else:
            centers = torch.as_tensor(list(bias_centers), dtype=torch.float64)
            if centers.numel() != n_bias:
                raise ControlMDError(
                    f"bias_centers has {centers.numel()} values for n_bias = {n_bias}"
                )
        check_int("n_bias", n_bias)
        self.bias_centers = centers
        self.bias_width = float(bias_width)
        if bias_pairs == "native":
            self.bias_index = self.contacts
        else:
            i, j = torch.triu_indices(n, n, offset=3)
            self.bias_index = torch.stack([i, j], dim=1)

        def add(channel: str, lo: float, hi: float, unit: str) -> None:
            names.append(channel)
            low.append(float(lo))
            high.append(float(hi))
            units.append(unit)

        for kind in controls:
            start = len(names)
            if kind == "temperature":
                add("kT", kT_min, kT_max, "epsilon")
            elif kind == "epsilon":
                add("eps_scale", eps_min, eps_max, "1")
            elif kind == "tweezers":
                for i, j in self.tweezer_pairs:
                    add(f"force_{i}_{j}", -force_max, force_max, "epsilon/sigma")
            elif kind == "torsion":
                if torsion_channels == "one":
                    add("torsion", 0.0, torsion_max, "epsilon")
                else:
                    for k in range(self._dihedrals.shape[0]):
                        add(f"torsion_{k}", 0.0, torsion_max, "epsilon")
            elif kind == "field":
                pass  # no u(t) channel: the network lives in the neural_field protocol
            else:
                for m in range(n_bias):
                    add(f"bias_{m}", -bias_max, bias_max, "epsilon")
            self._slots[kind] = list(range(start, len(names)))
        self.controls = ControlChannels(tuple(names), tuple(low), tuple(high), tuple(units))
        self._h0_fixed, self._h0_attraction = self._build_h0()

    # ------------------------------------------------------------------ Hamiltonian

    def _build_h0(self) -> tuple[Potential, Potential]:
        """``(fixed terms, attraction)``: the attraction is what the epsilon channel scales."""
        n = self.n_beads
        bonded = HarmonicBond(self._bonds, k=self.k_bond, r0=self._b0) + HarmonicAngle(
            self._angles, k=self.k_angle, theta0=self._theta0
        )
        m = self._dihedrals.shape[0]
        if m > 0:
            # k [1 - cos(phi - phi*)] = k [1 + cos(n phi - (n phi* + pi))] for n = 1 and 3.
            quads = torch.cat([self._dihedrals, self._dihedrals])
            k = torch.cat([torch.full((m,), self.k_dihedral), torch.full((m,), self.k_dihedral3)])
            mult = torch.cat([torch.ones(m), torch.full((m,), 3.0)])
            phase = mult * self._phi0.repeat(2) + math.pi
            bonded = bonded + CosineDihedral(quads, k=k.double(), n=mult, phi0=phase.double())
        near = [(i, i + s) for s in (1,) for i in range(n - s)]
        repulsion = WCA(sigma=self.sigma_repulsive, epsilon=1.0, exclude=near)
        contacts = Morse(
            sigma=self.d_native,
            epsilon=self.eps_contact,
            alpha=self.contact_alpha,
            r_cut=None,
            shift="none",
            pairs=self.contacts,
        )
        attraction: Potential = contacts
        if self.eps_nonnative > 0:
            i, j = torch.triu_indices(n, n, offset=3)
            native = set(map(tuple, self.contacts.tolist()))
            keep = [k for k, p in enumerate(zip(i.tolist(), j.tolist())) if p not in native]
            pairs = torch.stack([i[keep], j[keep]], dim=1)
            attraction = attraction + LennardJones(
                sigma=1.0, epsilon=self.eps_nonnative, r_cut=None, shift="none", pairs=pairs
            )
        return bonded + repulsion, attraction

    def potential(self, protocol: Protocol) -> Potential:
        """``H0 + H_ctrl`` with the protocol's channels wired in (and the neural field of a
        ``neural_field`` protocol, :meth:`field_potential`)."""
        attraction = self._h0_attraction
        if "epsilon" in self._slots:
            attraction = ScaledPotential(attraction, protocol, channel=self._slots["epsilon"][0])
        total = self._h0_fixed + attraction
        if "tweezers" in self._slots:
            for (i, j), c in zip(self.tweezer_pairs, self._slots["tweezers"]):
                total = total + ConstantForce(
                    _Select(protocol, [c]),
                    particles=[i, j],
                    weights=[-1.0, 1.0],
                    direction=[1.0, 0.0, 0.0],
                )
        if "bias" in self._slots:
            bias = PairBias(self.bias_index, self.bias_centers, self.bias_width)
            total = total + ExternalField(bias, _Select(protocol, self._slots["bias"]))
        if "torsion" in self._slots:
            select = _Select(protocol, self._slots["torsion"])
            total = total + ExternalField(self._torsion_bias, select)
        field = self.field_potential(protocol)
        return total if field is None else total + field

    # ------------------------------------------------------------------ Task interface

    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> State:
        rng = ReplicaRNG(seed, n_replicas, first_replica=first_replica)
        R = random_coil(self.target, rng, contacts=self.contacts, d_native=self.d_native)
        return self._dynamics(self._h0_fixed + self._h0_attraction, self.kT).init(
            R, kT=self.kT, rng=rng
        )

    def integrator(self, protocol: Protocol) -> Integrator:
        self._protocol = protocol
        kT: Any = self.kT
        if "temperature" in self._slots:
            kT = ChannelSchedule(protocol, self._slots["temperature"][0])
        return self._dynamics(self.potential(protocol), kT)

    def _dynamics(self, potential: Potential, kT: Any) -> Langevin:
        return Langevin(OneGraph(potential), dt=self.dt, kT=kT, gamma=self.gamma)

    def loss(self, state: State) -> Tensor:
        R = state.R
        q = native_contact_fraction(
            R,
            self.contacts,
            self.d_native,
            tol=self.contact_tolerance,
            smooth=True,
            sharpness=self.q_sharpness,
        )
        per_replica = 1.0 - q
        if self.w_dihedral > 0 and self._phi0.numel() > 0:
            per_replica = per_replica + self.w_dihedral * self.torsion_misfit(R)
        return self.add_field_cost(per_replica.mean(), state)

    def metric(self, state: State) -> Tensor:
        with torch.no_grad():
            return self.folded(state.R).to(torch.float64)

    def observe(self, state: State) -> Tensor:
        with torch.no_grad():
            R = state.R.detach()
            return torch.stack(
                [self.contact_fraction(R), kabsch_rmsd(R, self.target), radius_of_gyration(R)],
                dim=-1,
            ).to(torch.float64)

    def default_control(self) -> Tensor:
        """The control value ``[k]`` that leaves H0 and the bath as built (no control):
        the bath ``kT``, epsilon scale 1, zero forces, bias and torsion bias."""
        u = torch.zeros(self.controls.dim, dtype=torch.float64)
        if "temperature" in self._slots:
            u[self._slots["temperature"][0]] = self.kT
        if "epsilon" in self._slots:
            u[self._slots["epsilon"][0]] = 1.0
        return u

    def extras(self) -> dict[str, Any]:
        return {
            "target": self.target_name,
            "n_beads": self.n_beads,
            "n_native_contacts": self.n_contacts,
            "controls": list(self.channel_kinds),
            "dt": self.dt,
            "n_steps": self.n_steps,
            "horizon": self.horizon,
            "folded_rule": f"Q >= {self.q_folded} and Kabsch RMSD < {self.rmsd_folded} sigma",
        }

    # ------------------------------------------------------------------ structure measures

    def torsion_angles(self, R: Tensor) -> Tensor:
        """The chain's torsions ``[B, K]`` (rad; the native ones are the target's)."""
        return _torsion_angles(R, self._dihedrals)

    def torsion_misfit(self, R: Tensor) -> Tensor:
        """``mean_k (1 - cos(phi_k - phi*_k)) / 2`` per replica ``[B]`` (0 native, 1 all flipped)."""
        return 0.5 * self._torsion_bias.misfit(R).mean(-1)

    def contact_fraction(self, R: Tensor) -> Tensor:
        """Exact Q ``[B]``."""
        return native_contact_fraction(
            R, self.contacts, self.d_native, tol=self.contact_tolerance, smooth=False
        )

    def folded(self, R: Tensor) -> Tensor:
        """Exact folded indicator ``[B]`` bool: ``Q >= q_folded`` and RMSD < ``rmsd_folded``."""
        R = R.detach()
        return (self.contact_fraction(R) >= self.q_folded) & (
            kabsch_rmsd(R, self.target) < self.rmsd_folded
        )

    # ------------------------------------------------------------------ artifacts

    def _write_artifacts(self, R: Tensor, run_dir: Path) -> tuple[list[Path], Any]:
        from controlmd.io import write_xyz
        from controlmd.plotting import save_figure

        q, rmsd, folded = self.contact_fraction(R), kabsch_rmsd(R, self.target), self.folded(R)
        xyz = write_xyz(
            run_dir / "final_replicas.xyz",
            R,
            species="C",
            info={
                "replica": torch.arange(R.shape[0]),
                "Q": q,
                "rmsd": rmsd,
                "folded": folded.to(torch.int64),
            },
        )
        fig = _chain_figure(
            kabsch_align(R, self.target),
            self.target,
            q,
            rmsd,
            folded,
            title=f"{self.name} ({self.target_name}): final replicas, aligned on the target",
        )
        png = run_dir / "final_snapshots.png"
        save_figure(fig, png)
        return [xyz, png], fig


def _chain_figure(
    R: Tensor,
    target: Tensor,
    q: Tensor,
    rmsd: Tensor,
    folded: Tensor,
    *,
    title: str,
    max_panels: int = 8,
) -> Any:
    """Chains (aligned on the target) projected on the x-z plane, the target in grey."""
    fig, axes = panel_grid(R.shape[0], max_panels=max_panels)
    T = target.numpy()
    for k, ax in enumerate(axes):
        X = R[k].numpy()
        ax.plot(T[:, 0], T[:, 2], "-", color="0.8", lw=3)
        color = "tab:green" if bool(folded[k]) else "tab:red"
        ax.plot(X[:, 0], X[:, 2], "o-", color=color, ms=3, lw=1.2)
        ax.plot(X[:1, 0], X[:1, 2], "ks", ms=4)
        ax.set_aspect("equal")
        ax.set_title(f"Q={float(q[k]):.2f} RMSD={float(rmsd[k]):.2f}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig

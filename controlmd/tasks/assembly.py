"""Self-assembly of the compact hexagonal heptamer from sticky disks under a time-dependent
interaction strength and/or temperature.

System
    ``n_particles`` = 7 disks (diameter sigma = 1) per replica in a periodic square box of
    side ``L`` set by the area fraction ``phi = n pi sigma^2 / (4 L^2)`` (default 0.15:
    ``L = 6.05``), ``R`` ``[B, 7, 2]``. Pair potential: short-range Morse
    ``eps(t) [(1 - exp(-alpha (r - sigma)))^2 - 1]`` with ``alpha = 6`` (well width ~
    0.17 sigma), minimum ``-eps`` at contact ``r = sigma``, truncated at ``r_cut = 2.5``
    (no shift: the tail there is ``3e-4 eps``). Overdamped Brownian dynamics
    (:class:`~controlmd.dynamics.brownian.Brownian`, Euler–Maruyama) with friction
    ``gamma`` (free diffusion ``D = kT / gamma``), temperature ``kT``, time step ``dt``,
    horizon ``T = n_steps dt`` (default 6000 x 3e-4 = 1.8 tau).

    Why control matters: strong attraction sticks disks where they meet, locking open
    7-clusters with 11 bonds (rigid chains of triangles) that only rearrange by breaking
    bonds; weak attraction lets clusters rearrange but also evaporate into the dilute box.
    The best constant strength trades the two off; a protocol can do both in sequence.

Control channels (``controls``, in the order given)
    ===========  ==================================  =============  =============  =======
    name         coupling                            min            max            unit
    ===========  ==================================  =============  =============  =======
    epsilon      Morse well depth eps(t)             ``eps_min``    ``eps_max``    epsilon
    temperature  bath kT(t) (noise and diffusion)    ``kT_min``     ``kT_max``     epsilon
    basis        coefficients c_k(t) of a fixed      -basis_max     basis_max      epsilon
                 spatial basis (K channels c0..),
                 :class:`~controlmd.potentials.BasisField`
    confinement  stiffness k(t) of 0.5 k |r - c|^2,  0              confinement_   epsilon/
                 c the box centre (minimum image)                   max            sigma^2
    field        a neural field V_theta(x, t) (no    -field_max     field_max      epsilon
                 u(t) channel: the network lives in  (of V)         (of V)
                 a ``neural_field`` protocol)
    wave         a radial wave travelling inward,    A: 0           A: wave_max    epsilon
                 two channels: amplitude A(t) and    s: -wave_      s: wave_       sigma
                 phase s(t),                         phase_max      phase_max
                 :class:`~controlmd.potentials.RadialWave`
    ===========  ==================================  =============  =============  =======

    Without the epsilon channel the depth is ``epsilon``; without the temperature channel
    the bath is at ``kT``; the spatial fields (basis, confinement, field, wave) are zero when
    not controlled, which is also their no-control value (for the wave: A = 0, s = 0).
    ``max_field`` bounds ``|V|``.

    Field cost: with a spatial field the final state carries ``aux["field_cost"]`` ``[B]``
    = ``integral mean_i |F_i(t)|^2 dt`` of the field's force (trapezoid over frames every
    ``field_cost_every`` steps, plus the last step), differentiable; ``[protocol]
    field_cost_weight`` adds ``w * mean_b field_cost`` to the loss, and evaluation reports
    its mean.

Observation (feedback protocols, gymnasium env)
    =====  ===========================================  ======  =====
    index  quantity                                     range   unit
    =====  ===========================================  ======  =====
    0      bonds / 12 (exact bond graph)                [0, 2]  1
    1      largest cluster size / n_particles           [0, 1]  1
    2      largest coordination number / 6              [0, 1]  1
    =====  ===========================================  ======  =====

Outcome
    Exact metric (reported): yield, the fraction of particles of each replica that belong
    to a compact heptamer at ``T``: a connected component of the bond graph (bond: pair
    distance < ``bond_cutoff`` = 1.25 sigma, minimum image) with exactly 7 particles, 12
    bonds and one particle of coordination 6. With 7 disks per replica it is 1 or 0; the
    reported value is the mean over replicas. 12 is the most bonds 7 disks can have, and
    only the hexagon (one disk ringed by six) reaches it.
    Surrogate loss (``surrogate = "bonds"``, minimized): ``mean_b [1 - n_b / n_max]`` with
    ``n_b = sum_{i<j} sigmoid((bond_cutoff - r_ij) / bond_width)`` the smooth bond count
    and ``n_max = 12 n_particles / 7``. It tracks the yield because every open 7-cluster
    has at most 11 bonds and monomers or small clusters have fewer, so raising the bond
    count can only move replicas toward the heptamer. ``surrogate = "yield"`` uses
    ``1 - exact yield`` itself: no pathwise gradient, meant for the score-function
    estimator (``[train] estimator = "score"``), which is unbiased for the exact metric.
    ``surrogate = "gather"``: ``mean_b mean_{i<j} |r_ij|^2 / (L^2 / 6)`` (minimum image;
    about 1 for the dilute starting gas, 0 when all disks coincide), a smooth measure of how
    far the disks are from gathering, blind to how they bond; meant for controls whose job
    is to bring the disks together (on the radial wave its gradient was measured to be as
    noisy as the bond count's: docs/fields.md).

Starting state
    Disks placed uniformly at random in the box, no two closer than 1.05 sigma (a quench
    from a dilute gas); replica ``i`` draws from ``replica_seed(seed, first_replica + i)``.

Episode end
    Truncation at ``T`` (``n_steps`` steps); no termination.

Units
    Reduced units: length sigma (disk diameter), energy epsilon = kT at the default
    temperature, time tau = gamma sigma^2 / epsilon (the time to diffuse ~sigma at kT = 1).

Arguments
    ================  =========  ============  ==============================================
    name              type       default       effect
    ================  =========  ============  ==============================================
    n_particles       int        7             disks per replica
    cluster_size      int        7             target cluster size (<= n_particles)
    target_bonds      int        12            bonds of the target cluster
    area_fraction     float      0.15          sets the box side L
    controls          list[str]  ["epsilon"]   from "epsilon", "temperature", "basis",
                                               "confinement", "field", "wave"
    epsilon           float      6.0           well depth when not controlled
    kT                float      1.0           temperature when not controlled
    eps_min           float      2.0           epsilon bounds
    eps_max           float      10.0
    kT_min            float      0.5           temperature bounds
    kT_max            float      2.0
    alpha             float      6.0           Morse inverse width (1/sigma)
    r_cut             float      2.5           Morse cutoff (sigma)
    pair_forces       str        "autograd"    Morse forces: "autograd" (Morse, the forces of
                                               every shipped run) or "analytic" (DenseMorse,
                                               closed form: the same function, equal to
                                               round-off; fast under [experiment] fused_steps)
    gamma             float      1.0           friction
    dt                float      3e-4          time step (tau)
    n_steps           int        6000          steps per episode
    bond_cutoff       float      1.25          bond graph cutoff (sigma)
    bond_width        float      0.05          surrogate switch width (sigma)
    surrogate         str        "bonds"       "bonds", "yield" or "gather"
    basis_kind        str        "gaussian"    "gaussian" (wells on a grid) or "fourier"
    basis_grid        int        3             wells per axis (gaussian)
    basis_width       float      1.0           well width (gaussian, <= L/3)
    basis_modes       int        1             highest mode per axis (fourier)
    basis_max         float      10.0          bound of each basis coefficient |c_k|
    confinement_max   float      100.0         upper bound of the confinement stiffness
    wave_max          float      3.0           upper bound of the wave amplitude A (epsilon)
    wave_wavelength   float      1.0           wavelength lambda of the wave (sigma)
    wave_inner        float      1.2           radius r_in of the wave-free core (sigma)
    wave_phase_max    float      100.0         bound of the wave phase |s| (sigma)
    field_cost_every  int        10            steps between field-cost frames
    ================  =========  ============  ==============================================

Version history
    v0: initial version. Spatial channels (basis, confinement, field) and the field cost
    added later without changing the defaults or the existing channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import nn

from controlmd._validation import check_choice, check_int, check_positive
from controlmd.dynamics.base import Integrator, State
from controlmd.dynamics.brownian import Brownian
from controlmd.errors import ControlMDError
from controlmd.potentials.analytic import DenseMorse, ScaledDense
from controlmd.potentials.base import Potential
from controlmd.potentials.external import ScaledPotential
from controlmd.potentials.fields import BASIS_KINDS, BasisField, Confinement, RadialWave
from controlmd.potentials.pair import Morse
from controlmd.protocols import Protocol
from controlmd.rng import ReplicaRNG
from controlmd.space import periodic
from controlmd.structures import (
    bond_graph,
    cluster_labels,
    smooth_bond_count,
    target_cluster_fraction,
)
from controlmd.tasks._artifacts import ChannelSchedule, check_controls, panel_grid
from controlmd.tasks._field_channel import FieldChannelTask
from controlmd.tasks.base import ControlChannels, TaskCapabilities
from controlmd.tasks.registry import register_task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from controlmd.logger import Logger

Tensor = torch.Tensor

__all__ = ["Assembly", "random_gas"]

CHANNELS = ("epsilon", "temperature", "basis", "confinement", "field", "wave")
SPATIAL = ("basis", "confinement", "field", "wave")
SURROGATES = ("bonds", "yield", "gather")
_MIN_START_DISTANCE = 1.05


class _BasisArgs(TypedDict):
    """The :class:`BasisField` keyword arguments fixed by the task's configuration."""

    basis: str
    n_grid: int
    width: float
    n_modes: int


class _Constant(nn.Module):
    """A constant control value ``[1]`` (the epsilon scale when it is not a channel)."""

    value: Tensor  # buffer [1]

    def __init__(self, value: float) -> None:
        super().__init__()
        self.register_buffer(
            "value", torch.tensor([float(value)], dtype=torch.float64), persistent=False
        )

    def forward(self, t: Tensor) -> Tensor:
        return self.value


def random_gas(
    n_particles: int,
    box: float,
    rng: ReplicaRNG,
    *,
    min_distance: float = _MIN_START_DISTANCE,
    max_tries: int = 10_000,
) -> Tensor:
    """Uniform random positions in a periodic square box with no pair closer than
    ``min_distance`` (minimum image), one configuration per replica of ``rng`` (random
    sequential addition, each replica from its own generator).

    :return: positions ``[B, n_particles, 2]`` float64 in ``[0, box)``.
    """
    out = []
    for g in rng.generators:
        pts: list[tuple[float, float]] = []
        tries = 0
        while len(pts) < n_particles:
            tries += 1
            if tries > max_tries:
                raise ControlMDError(
                    f"could not place {n_particles} disks {min_distance} apart in a box of side {box:g} "
                    f"after {max_tries} tries: lower the area fraction"
                )
            x, y = (torch.rand(2, generator=g, dtype=torch.float64) * box).tolist()
            if all(_min_image_sq(x - a, y - b, box) >= min_distance**2 for a, b in pts):
                pts.append((x, y))
        out.append(pts)
    return torch.tensor(out, dtype=torch.float64)


def _min_image_sq(dx: float, dy: float, box: float) -> float:
    dx -= box * round(dx / box)
    dy -= box * round(dy / box)
    return dx * dx + dy * dy


def _sample(field: Potential, X: Tensor, times: Tensor) -> Tensor:
    """``V`` felt by one particle at each of the points ``X`` ``[P, 1, d]`` at each of
    ``times`` ``[n_t]``: ``[n_t, P]`` float64, without a graph."""
    with torch.no_grad():
        return torch.stack([field.energy(X, t) for t in times]).to(torch.float64)


def _field_figure(values: Tensor, figsize: tuple[float, float]) -> tuple[Figure, float]:
    """An empty figure for heat maps of ``values`` and their symmetric colour scale
    ``max |values|`` (at least 1e-12)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, max(float(values.abs().max()), 1e-12)


@register_task
class Assembly(FieldChannelTask):
    """Maximize the yield of compact heptamers; see the module docstring.

    Example:
        >>> task = Assembly(n_steps=10)
        >>> round(task.box, 3), task.controls.names
        (6.054, ('eps',))
        >>> from controlmd.protocols import PiecewiseConstant
        >>> u = PiecewiseConstant(t_final=task.horizon, n_pieces=2, low=2.0, high=10.0, init=6.0)
        >>> task.metric(task.rollout(u, 4, seed=0, gradient="none")).tolist()
        [0.0, 0.0, 0.0, 0.0]
    """

    name = "assembly"
    metric_name = "heptamer_yield"
    higher_is_better = True
    units = "reduced units: length sigma (disk diameter), energy epsilon (kT = 1 by default), time tau = gamma sigma^2 / epsilon"
    capabilities = TaskCapabilities(estimators=("pathwise", "score", "forward"))
    field_system = "the assembly disks"
    field_region = "the assembly box"

    def __init__(
        self,
        *,
        n_particles: int = 7,
        cluster_size: int = 7,
        target_bonds: int = 12,
        area_fraction: float = 0.15,
        controls: Sequence[str] = ("epsilon",),
        epsilon: float = 6.0,
        kT: float = 1.0,
        eps_min: float = 2.0,
        eps_max: float = 10.0,
        kT_min: float = 0.5,
        kT_max: float = 2.0,
        alpha: float = 6.0,
        r_cut: float = 2.5,
        pair_forces: str = "autograd",
        gamma: float = 1.0,
        dt: float = 3e-4,
        n_steps: int = 6000,
        bond_cutoff: float = 1.25,
        bond_width: float = 0.05,
        surrogate: str = "bonds",
        basis_kind: str = "gaussian",
        basis_grid: int = 3,
        basis_width: float = 1.0,
        basis_modes: int = 1,
        basis_max: float = 10.0,
        confinement_max: float = 100.0,
        wave_max: float = 3.0,
        wave_wavelength: float = 1.0,
        wave_inner: float = 1.2,
        wave_phase_max: float = 100.0,
        field_cost_every: int = 10,
    ) -> None:
        check_int("n_particles", n_particles, minimum=2)
        check_int("cluster_size", cluster_size, minimum=2)
        if cluster_size > n_particles:
            raise ControlMDError(
                f"cluster_size = {cluster_size} exceeds the particle count n_particles = {n_particles}"
            )
        check_int("target_bonds", target_bonds)
        max_bonds = cluster_size * (cluster_size - 1) // 2
        if target_bonds > max_bonds:
            raise ControlMDError(
                f"target_bonds = {target_bonds} exceeds the {max_bonds} pairs of a {cluster_size}-particle cluster"
            )
        check_controls(controls, CHANNELS)
        for name, value in (
            ("area_fraction", area_fraction),
            ("epsilon", epsilon),
            ("kT", kT),
            ("eps_min", eps_min),
            ("eps_max", eps_max),
            ("kT_min", kT_min),
            ("kT_max", kT_max),
            ("alpha", alpha),
            ("r_cut", r_cut),
            ("gamma", gamma),
            ("dt", dt),
            ("bond_cutoff", bond_cutoff),
            ("bond_width", bond_width),
            ("basis_max", basis_max),
            ("confinement_max", confinement_max),
            ("wave_max", wave_max),
            ("wave_wavelength", wave_wavelength),
            ("wave_phase_max", wave_phase_max),
        ):
            check_positive(name, value)
        if not eps_min < eps_max:
            raise ControlMDError(
                f"epsilon bounds need eps_min < eps_max, got [{eps_min}, {eps_max}]"
            )
        if not kT_min < kT_max:
            raise ControlMDError(
                f"temperature bounds need kT_min < kT_max, got [{kT_min}, {kT_max}]"
            )
        if area_fraction >= 0.5:
            raise ControlMDError(
                f"area_fraction = {area_fraction} is too dense for random placement (need < 0.5)"
            )
        if not 1.0 < bond_cutoff < math.sqrt(3.0):
            raise ControlMDError(
                f"bond_cutoff must lie between contact (1) and the second-neighbour distance "
                f"sqrt(3) of a hexagonal cluster, got {bond_cutoff}"
            )
        check_int("n_steps", n_steps)
        check_int("field_cost_every", field_cost_every)
        check_choice("surrogate", surrogate, SURROGATES)
        check_choice("pair_forces", pair_forces, ("autograd", "analytic"))
        check_choice("basis_kind", basis_kind, BASIS_KINDS)
        self.n_particles = n_particles
        self.cluster_size = cluster_size
        self.target_bonds = target_bonds
        self.area_fraction = float(area_fraction)
        self.box = math.sqrt(n_particles * math.pi / 4.0 / area_fraction)
        self.space = periodic(self.box, dim=2)
        self.spatial_dim = 2
        self.space.check_cutoff("r_cut", r_cut)
        self.epsilon = float(epsilon)
        self.kT = float(kT)
        self.alpha = float(alpha)
        self.r_cut = float(r_cut)
        self.gamma = float(gamma)
        self.dt = float(dt)
        self.n_steps = n_steps
        self.bond_cutoff = float(bond_cutoff)
        self.bond_width = float(bond_width)
        self.surrogate = surrogate
        self.channel_kinds = tuple(controls)
        self.basis_max = float(basis_max)
        self.confinement_max = float(confinement_max)
        self.wave_max = float(wave_max)
        self.wave_wavelength = float(wave_wavelength)
        self.wave_inner = float(wave_inner)
        if "wave" in controls and not 0.0 <= wave_inner < self.box / 2.0 - 0.5 * wave_wavelength:
            raise ControlMDError(
                f"wave_inner = {wave_inner:g} does not fit the box: the wave-free core plus "
                f"half a wavelength ({0.5 * wave_wavelength:g}) must stay inside L/2 = {self.box / 2.0:g}"
            )
        self.field_cost_every = field_cost_every
        self._basis_args: _BasisArgs = {
            "basis": basis_kind,
            "n_grid": basis_grid,
            "width": basis_width,
            "n_modes": basis_modes,
        }
        n_basis = 0
        if "basis" in controls:
            n_basis = BasisField(self.space, _Constant(0.0), **self._basis_args).n_basis
        rows: dict[str, list[tuple[str, float, float, str, float]]] = {
            "epsilon": [("eps", eps_min, eps_max, "epsilon", self.epsilon)],
            "temperature": [("kT", kT_min, kT_max, "epsilon", self.kT)],
            "basis": [
                (f"c{k}", -self.basis_max, self.basis_max, "epsilon", 0.0) for k in range(n_basis)
            ],
            "confinement": [("k", 0.0, self.confinement_max, "epsilon/sigma^2", 0.0)],
            "field": [],
            "wave": [
                ("A", 0.0, self.wave_max, "epsilon", 0.0),
                ("s", -float(wave_phase_max), float(wave_phase_max), "sigma", 0.0),
            ],
        }
        self._slot: dict[str, int] = {}
        channels: list[tuple[str, float, float, str, float]] = []
        for kind in controls:
            self._slot[kind] = len(channels)
            channels += rows[kind]
        self._default = [row[4] for row in channels]
        self.controls = ControlChannels(
            tuple(row[0] for row in channels),
            tuple(float(row[1]) for row in channels),
            tuple(float(row[2]) for row in channels),
            tuple(row[3] for row in channels),
        )
        # Morse with unit depth; the depth eps(t) enters through ScaledPotential.
        self.pair_forces = pair_forces
        self._morse: Potential = (
            Morse(
                self.space, sigma=1.0, epsilon=1.0, alpha=self.alpha, r_cut=self.r_cut, shift="none"
            )
            if pair_forces == "autograd"
            else DenseMorse(self.space, sigma=1.0, epsilon=1.0, alpha=self.alpha, r_cut=self.r_cut)
        )

    # ------------------------------------------------------------------ Task interface

    def potential(self, protocol: Protocol | None) -> Potential:
        """``eps(t) * Morse`` (eps from the protocol's channel, or the constant ``epsilon``)
        plus the spatial control field (:meth:`field_potential`) when there is one."""
        scaled = ScaledDense if self.pair_forces == "analytic" else ScaledPotential
        if protocol is not None and "epsilon" in self._slot:
            pair = scaled(self._morse, protocol, channel=self._slot["epsilon"])
        else:
            pair = scaled(self._morse, _Constant(self.epsilon), channel=0)
        field = self.field_potential(protocol)
        return pair if field is None else pair + field

    def field_potential(self, protocol: Protocol | None) -> Potential | None:
        """The spatial control terms driven by ``protocol`` (basis field, confinement,
        neural field, radial wave), summed; ``None`` when the task has none or ``protocol`` is ``None``."""
        if protocol is None:
            return None
        terms: list[Potential] = []
        if "basis" in self._slot:
            terms.append(
                BasisField(self.space, protocol, channel=self._slot["basis"], **self._basis_args)
            )
        if "confinement" in self._slot:
            terms.append(Confinement(self.space, protocol, channel=self._slot["confinement"]))
        if "wave" in self._slot:
            terms.append(
                RadialWave(
                    self.space,
                    protocol,
                    wavelength=self.wave_wavelength,
                    inner_radius=self.wave_inner,
                    channel=self._slot["wave"],
                )
            )
        neural = self.neural_field(protocol)
        if neural is not None:
            terms.append(neural)
        if not terms:
            return None
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

    def max_field(self, protocol: Protocol) -> float | None:
        """Bound on ``|V(x, t)|`` summed over the spatial terms (energy units): neural
        ``V_max``; ``basis_max max_x sum_k |b_k(x)|`` (on a grid); ``confinement_max L^2 / 4``
        (``0.5 k |r - c|^2`` at a box corner); ``wave_max``."""
        if not any(kind in self._slot for kind in SPATIAL):
            return None
        bound = 0.0
        if "basis" in self._slot:
            basis = BasisField(self.space, protocol, **self._basis_args)
            bound += self.basis_max * basis.max_abs_sum()
        if "confinement" in self._slot:
            bound += self.confinement_max * self.box**2 / 4.0
        if "wave" in self._slot:
            bound += self.wave_max
        bound += super().max_field(protocol) or 0.0
        return bound

    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> State:
        rng = ReplicaRNG(seed, n_replicas, first_replica=first_replica)
        R = random_gas(self.n_particles, self.box, rng)
        return self._dynamics(self.potential(None), self.kT).init(R, rng=rng)

    def integrator(self, protocol: Protocol) -> Integrator:
        self._protocol = protocol
        kT: Any = self.kT
        if "temperature" in self._slot:
            kT = ChannelSchedule(protocol, self._slot["temperature"])
        return self._dynamics(self.potential(protocol), kT)

    def _dynamics(self, potential: Potential, kT: Any) -> Brownian:
        return Brownian(potential, dt=self.dt, kT=kT, gamma=self.gamma, space=self.space)

    def loss(self, state: State) -> Tensor:
        if self.surrogate == "yield":
            loss = 1.0 - self.metric(state).mean()
        elif self.surrogate == "gather":
            R = state.R
            dR = self.space.displacement(R.unsqueeze(-2), R.unsqueeze(-3))  # [B, N, N, d]
            i, j = torch.triu_indices(R.shape[-2], R.shape[-2], offset=1)
            r2 = (dR[..., i, j, :] ** 2).sum(-1)  # [B, pairs]
            loss = (r2.mean(-1) / (self.box**2 / 6.0)).mean()
        else:
            n_max = self.target_bonds * self.n_particles / self.cluster_size
            bonds = smooth_bond_count(
                state.R, self.bond_cutoff, width=self.bond_width, space=self.space
            )
            loss = (1.0 - bonds / n_max).mean()
        return self.add_field_cost(loss, state)

    def metric(self, state: State) -> Tensor:
        with torch.no_grad():
            return self.yield_(state.R)

    def observe(self, state: State) -> Tensor:
        with torch.no_grad():
            A = bond_graph(state.R.detach(), self.bond_cutoff, self.space)
            labels = cluster_labels(A)
            largest = torch.stack(
                [torch.bincount(row, minlength=self.n_particles).max() for row in labels]
            )
            bonds = A.sum(dim=(1, 2)) / 2
            degree = A.sum(-1).amax(-1)
            return torch.stack(
                [bonds / self.target_bonds, largest / self.n_particles, degree / 6.0], dim=-1
            ).to(torch.float64)

    def default_control(self) -> Tensor:
        """The uncontrolled value ``[k]``: the constant ``epsilon`` and ``kT``, zero field
        coefficients and confinement."""
        return torch.tensor(self._default, dtype=torch.float64)

    def extras(self) -> dict[str, Any]:
        return {
            "n_particles": self.n_particles,
            "area_fraction": self.area_fraction,
            "box": self.box,
            "controls": list(self.channel_kinds),
            "dt": self.dt,
            "n_steps": self.n_steps,
            "horizon": self.horizon,
            "yield_rule": (
                f"connected cluster of {self.cluster_size} with {self.target_bonds} bonds "
                f"(r < {self.bond_cutoff} sigma)"
                + (" and a particle of coordination 6" if self._is_heptamer else "")
            ),
        }

    # ------------------------------------------------------------------ structure measures

    @property
    def _is_heptamer(self) -> bool:
        return (self.cluster_size, self.target_bonds) == (7, 12)

    def yield_(self, R: Tensor) -> Tensor:
        """Exact yield of each replica ``[B]`` (fraction of particles in target clusters)."""
        A = bond_graph(R.detach(), self.bond_cutoff, self.space)
        max_degree = 6 if self._is_heptamer else None
        return target_cluster_fraction(
            A, size=self.cluster_size, n_bonds=self.target_bonds, max_degree=max_degree
        ).to(torch.float64)

    # ------------------------------------------------------------------ field maps

    def field_map(self, protocol: Protocol, times: Tensor, *, n_grid: int = 48) -> Tensor | None:
        """The spatial control potential ``V(x, t)`` felt by one disk (energy units) on an
        ``n_grid^2`` grid of the box at each of ``times`` ``[n_t]``: ``[n_t, n_grid, n_grid]``
        (axis 1 is x, axis 2 is y), or ``None`` without a spatial field."""
        field = self.field_potential(protocol)
        if field is None:
            return None
        check_int("n_grid", n_grid)
        ax = (torch.arange(n_grid, dtype=torch.float64) + 0.5) * self.box / n_grid
        X = torch.stack(torch.meshgrid(ax, ax, indexing="ij"), dim=-1).reshape(-1, 1, 2)
        return _sample(field, X, times).reshape(-1, n_grid, n_grid)

    def field_section(
        self, protocol: Protocol, times: Tensor, *, n_points: int = 97
    ) -> Tensor | None:
        """``V(x, L/2, t)`` felt by one disk along the horizontal line through the box centre
        (``n_points`` equally spaced ``x`` in ``[0, L]``) at each of ``times`` ``[n_t]``:
        ``[n_t, n_points]`` (energy units), or ``None`` without a spatial field. Drawn over
        time it shows moving patterns (a wave's troughs travelling inward) that a few
        snapshots cannot."""
        field = self.field_potential(protocol)
        if field is None:
            return None
        check_int("n_points", n_points, minimum=2)
        x = torch.linspace(0.0, self.box, n_points, dtype=torch.float64)
        X = torch.stack([x, torch.full_like(x, self.box / 2.0)], dim=-1).reshape(-1, 1, 2)
        return _sample(field, X, times)

    def save_field_kymograph(
        self, protocol: Protocol, path: str | Path, *, n_times: int = 241, n_points: int = 97
    ) -> Path | None:
        """:meth:`field_section` as a space-time heat map (x across, t up), written to
        ``path`` (PNG); ``None`` without a spatial field."""
        from controlmd.plotting import save_figure

        times = self._figure_times(n_times)
        section = self.field_section(protocol, times, n_points=n_points)
        if section is None:
            return None
        fig, scale = _field_figure(section, (4.8, 4.0))
        ax = fig.subplots()
        image = ax.imshow(
            section.numpy(),
            origin="lower",
            aspect="auto",
            extent=(0.0, self.box, 0.0, self.horizon),
            cmap="RdBu_r",
            vmin=-scale,
            vmax=scale,
        )
        ax.set_xlabel("x through the box centre (sigma)")
        ax.set_ylabel("t (tau)")
        fig.colorbar(image, ax=ax, label="V (epsilon)")
        out = Path(path)
        save_figure(fig, out)
        return out

    def save_field_maps(
        self, protocol: Protocol, path: str | Path, *, n_times: int = 6, n_grid: int = 48
    ) -> Path | None:
        """Heat maps of :meth:`field_map` at ``n_times`` equally spaced times of ``[0, T]``
        (one colour scale for all panels), written to ``path`` (PNG); ``None`` without a
        spatial field."""
        from controlmd.plotting import save_figure

        times = self._figure_times(n_times)
        maps = self.field_map(protocol, times, n_grid=n_grid)
        if maps is None:
            return None
        fig, scale = _field_figure(maps, (2.4 * n_times, 2.6))
        axes = fig.subplots(1, n_times, squeeze=False)[0]
        image = None
        for ax, t, V in zip(axes, times.tolist(), maps):
            image = ax.imshow(
                V.T.numpy(),
                origin="lower",
                extent=(0.0, self.box, 0.0, self.box),
                cmap="RdBu_r",
                vmin=-scale,
                vmax=scale,
            )
            ax.set_title(f"t = {t / self.horizon:.2f} T", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        if image is None:
            raise ControlMDError(f"no field map drawn (n_times = {n_times})")
        fig.colorbar(image, ax=list(axes), label="V (epsilon)", shrink=0.8)
        out = Path(path)
        save_figure(fig, out)
        return out

    def _figure_times(self, n_times: int) -> Tensor:
        """``n_times`` equally spaced times of ``[0, T]`` ``[n_times]`` for the field plots."""
        check_int("n_times", n_times, minimum=2)
        return torch.linspace(0.0, self.horizon, n_times, dtype=torch.float64)

    def finish_run(
        self, run_dir: str | Path, logger: Logger | None = None, step: int = 0
    ) -> dict[str, Any]:
        """The final-replica artifacts and, with a spatial field, ``field_maps.png`` and
        ``field_kymograph.png``."""
        summary = super().finish_run(run_dir, logger, step)
        if self._protocol is not None:
            for name, save in (
                ("field_maps.png", self.save_field_maps),
                ("field_kymograph.png", self.save_field_kymograph),
            ):
                path = save(self._protocol, Path(run_dir) / name)
                if path is not None:
                    summary["artifacts"] = [*summary.get("artifacts", []), path.name]
        return summary

    # ------------------------------------------------------------------ artifacts

    def _write_artifacts(self, R: Tensor, run_dir: Path) -> tuple[list[Path], Any]:
        from controlmd.io import write_xyz
        from controlmd.plotting import save_figure

        y = self.yield_(R)
        A = bond_graph(R, self.bond_cutoff, self.space)
        xyz = write_xyz(
            run_dir / "final_replicas.xyz",
            R,
            box=self.box,
            species="X",  # a dummy element: ASE and OVITO read it
            properties={"coordination": A.sum(-1).to(torch.int64)},
            info={
                "replica": torch.arange(R.shape[0]),
                "yield": y,
                "bonds": (A.sum(dim=(1, 2)) // 2).to(torch.int64),
            },
        )
        png = run_dir / "final_snapshots.png"
        fig = _disk_figure(R, A, y, self.box, title=f"{self.name}: final replicas")
        save_figure(fig, png)
        return [xyz, png], fig


def _disk_figure(
    R: Tensor, A: Tensor, y: Tensor, box: float, *, title: str, max_panels: int = 8
) -> Any:
    """Disks of each replica (unwrapped around the largest cluster), bonds as lines."""
    from matplotlib.patches import Circle

    fig, axes = panel_grid(R.shape[0], max_panels=max_panels)
    for k, ax in enumerate(axes):
        X = R[k]
        # Unwrap every disk to the minimum image of disk 0's neighbourhood for drawing.
        d = X - X[:1]
        X = X[:1] + d - box * torch.round(d / box)
        color = "tab:green" if float(y[k]) > 0 else "tab:orange"
        for i in range(X.shape[0]):
            ax.add_patch(Circle((float(X[i, 0]), float(X[i, 1])), 0.5, color=color, alpha=0.7))
            for j in range(i + 1, X.shape[0]):
                if bool(A[k, i, j]):
                    ax.plot(
                        [float(X[i, 0]), float(X[j, 0])],
                        [float(X[i, 1]), float(X[j, 1])],
                        "k-",
                        lw=0.8,
                    )
        c = X.mean(0)
        ax.set_xlim(float(c[0]) - box / 2, float(c[0]) + box / 2)
        ax.set_ylim(float(c[1]) - box / 2, float(c[1]) + box / 2)
        ax.set_aspect("equal")
        ax.set_title(f"bonds={int(A[k].sum()) // 2} yield={float(y[k]):.0f}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig

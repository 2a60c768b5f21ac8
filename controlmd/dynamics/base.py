"""State and integrator contracts shared by every equation of motion.

Units follow the task: reduced LJ units (sigma, epsilon, m, tau = sigma sqrt(m/epsilon))
for classical tasks; kT is an energy.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from controlmd._validation import check_positive
from controlmd.errors import ControlMDError
from controlmd.potentials.base import Potential
from controlmd.rng import ReplicaRNG
from controlmd.space import Space, free

Tensor = torch.Tensor
Schedule = float | Callable[[Tensor], Tensor]
"""A constant, or a function of time returning a scalar (or ``[B]``) tensor, e.g. kT(t)."""

__all__ = [
    "ControlSchedule",
    "Integrator",
    "Schedule",
    "State",
    "check_schedule",
    "evaluate_schedule",
    "kinetic_energy",
    "maxwell_boltzmann",
    "per_replica",
]


@dataclass
class State:
    """Dynamical state of ``B`` replicas.

    Attributes:
        R: positions ``[B, N, d]``.
        P: momenta ``[B, N, d]`` (``None`` for overdamped dynamics).
        t: time, 0-d tensor.
        step: number of integration steps taken.
        aux: extra per-replica tensors: thermostat variables (``xi``, ``p_xi`` ``[B, M]``),
            accumulators such as the protocol ``work`` ``[B]``.
        rng: per-replica noise streams for stochastic integrators.
    """

    R: Tensor
    P: Tensor | None = None
    t: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    step: int = 0
    aux: dict[str, Tensor] = field(default_factory=dict)
    rng: ReplicaRNG | None = None

    @property
    def n_replicas(self) -> int:
        return self.R.shape[0]

    def replace(self, **changes: object) -> State:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def detach(self) -> State:
        """The same state cut from the autograd graph (truncated backprop)."""
        return self.replace(
            R=self.R.detach(),
            P=None if self.P is None else self.P.detach(),
            t=self.t.detach(),
            aux={k: v.detach() for k, v in self.aux.items()},
        )


def evaluate_schedule(value: Schedule, t: Tensor) -> Tensor:
    """Value of a constant-or-callable schedule at time ``t`` as a tensor."""
    if callable(value):
        return torch.as_tensor(value(t))
    return torch.as_tensor(value, dtype=t.dtype, device=t.device)


def check_schedule(name: str, value: Schedule) -> None:
    """Validate a schedule at the boundary: a constant must be finite and > 0; a callable
    must give finite, positive values at ``t = 0``.

    Schedules whose values depend on learnable parameters should be ``nn.Module`` s (e.g. a
    :class:`ControlSchedule`) so that the integrator registers them and gradients and
    ``odeint_adjoint`` find their parameters.
    """
    if callable(value):
        try:
            v = evaluate_schedule(value, torch.zeros((), dtype=torch.float64))
        except Exception as exc:  # report which schedule failed, keep the cause
            raise ControlMDError(f"{name} schedule failed at t = 0: {exc}") from exc
        check_positive(f"{name}(t=0)", v.detach())
    elif isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise ControlMDError(f"{name} must be a number or a callable of t, got {value!r}")
    else:
        check_positive(name, value)


class ControlSchedule(nn.Module):
    """One channel of a protocol used as a schedule: ``t -> protocol(t)[index]``.

    Use it to make temperature (or friction) a control channel:
    ``Langevin(potential, dt=0.005, kT=ControlSchedule(protocol, 0))``.
    """

    def __init__(self, protocol: nn.Module, index: int = 0) -> None:
        super().__init__()
        self.protocol = protocol
        self.index = int(index)

    def forward(self, t: Tensor) -> Tensor:
        return self.protocol(t)[..., self.index]


def per_replica(value: Tensor, R: Tensor) -> Tensor:
    """A scalar or per-replica ``[B]`` value broadcastable against ``R`` ``[B, N, d]``."""
    value = value.to(R)
    return value.view(-1, 1, 1) if value.ndim == 1 else value


def kinetic_energy(P: Tensor, mass: Tensor) -> Tensor:
    """Kinetic energy ``sum_i |p_i|^2 / (2 m_i)`` of each replica ``[B]``.

    Args:
        P: momenta ``[B, N, d]``.
        mass: masses broadcastable against ``P`` (``[]`` or ``[1, N, 1]``).
    """
    return 0.5 * (P * P / mass).sum(dim=(-2, -1))


def maxwell_boltzmann(
    R: Tensor, mass: Tensor, kT: Tensor, rng: ReplicaRNG, *, remove_com: bool
) -> Tensor:
    """Momenta ``[B, N, d]`` drawn from the Maxwell–Boltzmann distribution at ``kT``.

    ``p_i = sqrt(m_i kT) xi_i`` with ``xi`` from each replica's own generator; with
    ``remove_com`` the centre-of-mass momentum is removed (``p_i -= m_i P_tot / M``), which
    leaves ``d N - d`` momentum degrees of freedom.

    Args:
        R: positions ``[B, N, d]`` (shape and dtype template).
        mass: masses broadcastable against ``R``.
        kT: temperature (energy), scalar or ``[B]``.
        rng: per-replica generators (``rng.n_replicas == B``).
        remove_com: subtract the centre-of-mass momentum.
    """
    B, N, d = R.shape
    if rng.n_replicas != B:
        raise ControlMDError(f"rng has {rng.n_replicas} replicas but R has B = {B}")
    xi = rng.randn(N, d, dtype=R.dtype).to(R.device)
    m = mass.expand(1, N, 1) if mass.ndim == 0 else mass
    P = torch.sqrt(m * per_replica(kT, R)) * xi
    if remove_com:
        P = P - m * P.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True)
    return P


class Integrator(nn.Module, ABC):
    """One integration step of an equation of motion, batched over replicas.

    Subclasses implement :meth:`init` and :meth:`step`; deterministic Hamiltonian ones also
    provide ``vector_field`` for the torchdiffeq path and ``invariant`` (the conserved
    quantity).

    Args:
        potential: the energy ``H0 + H_ctrl`` (an :class:`~controlmd.potentials.Potential`).
        dt: time step (> 0).
        mass: particle mass, scalar or ``[N]``.
        space: the box; positions are wrapped with ``space.shift`` after each step.
    """

    stochastic: ClassVar[bool] = False
    """Whether :meth:`step` draws noise from ``state.rng``."""

    def __init__(
        self,
        potential: Potential,
        *,
        dt: float,
        mass: float | Tensor = 1.0,
        space: Space | None = None,
    ) -> None:
        super().__init__()
        check_positive("dt", dt)
        check_positive("mass", mass)
        self.potential = potential
        self.dt = float(dt)
        self.register_buffer("_mass", torch.as_tensor(mass, dtype=torch.float64), persistent=False)
        self.space = space if space is not None else free()

    def mass_like(self, R: Tensor) -> Tensor:
        """Mass broadcastable against ``R`` ``[B, N, d]``: ``[]`` or ``[1, N, 1]``."""
        m = self._mass.to(R)
        return m if m.ndim == 0 else m.view(1, -1, 1)

    def potential_energy(self, state: State) -> Tensor:
        """Potential energy ``E(R, t)`` of each replica ``[B]``."""
        return self.potential.energy(state.R, state.t)

    @abstractmethod
    def init(self, R: Tensor, *, kT: float | None = None, rng: ReplicaRNG | None = None,
             P: Tensor | None = None) -> State:
        """Initial state from positions ``[B, N, d]`` (momenta drawn at ``kT`` with ``rng``)."""

    @abstractmethod
    def step(self, state: State) -> State:
        """Advance every replica by ``dt``."""

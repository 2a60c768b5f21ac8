"""State and integrator contracts shared by every equation of motion.

Units follow the task: reduced LJ units (sigma, epsilon, m, tau = sigma sqrt(m/epsilon))
for classical tasks; kT is an energy.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from controlmd._validation import check_positive
from controlmd.potentials.base import Potential
from controlmd.rng import ReplicaRNG
from controlmd.space import Space, free

Tensor = torch.Tensor
Schedule = float | Callable[[Tensor], Tensor]
"""A constant, or a function of time returning a scalar (or ``[B]``) tensor, e.g. kT(t)."""

__all__ = ["Integrator", "Schedule", "State"]


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

    @abstractmethod
    def init(self, R: Tensor, *, kT: float | None = None, rng: ReplicaRNG | None = None,
             P: Tensor | None = None) -> State:
        """Initial state from positions ``[B, N, d]`` (momenta drawn at ``kT`` with ``rng``)."""

    @abstractmethod
    def step(self, state: State) -> State:
        """Advance every replica by ``dt``."""

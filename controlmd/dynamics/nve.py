"""Microcanonical (NVE) dynamics: velocity Verlet for ``H = sum p^2/2m + E(q, t)``.

One step (``F_n = F(q_n, t_n)`` cached from the previous step)::

    p_{n+1/2} = p_n + dt/2 F_n
    q_{n+1}   = q_n + dt p_{n+1/2} / m          (wrapped by space.shift)
    p_{n+1}   = p_{n+1/2} + dt/2 F(q_{n+1}, t_{n+1})

(time-dependent terms as one-sided limits inside the step, see
:data:`~controlmd.dynamics.base.CONTROL_TIME_OFFSET`).

Symplectic and time-reversible for time-independent E; the energy error is bounded and
scales as dt^2. The same Hamiltonian vector field ``(dq/dt, dp/dt) = (p/m, F(q, t))`` is
exposed for torchdiffeq (:func:`~controlmd.simulate.simulate_ode`).

Units: reduced LJ units (length sigma, energy epsilon, mass m, time tau).

Reference: Swope, Andersen, Berens, Wilson, J. Chem. Phys. 76, 637 (1982).
"""

from __future__ import annotations

import torch

from controlmd.dynamics.base import MomentumIntegrator, Schedule, State
from controlmd.rng import ReplicaRNG

Tensor = torch.Tensor

__all__ = ["NVE"]


class NVE(MomentumIntegrator):
    """Velocity Verlet, batched over replicas.

    Args:
        potential: the energy ``E(q, t)``.
        dt: time step (> 0).
        mass: particle mass (> 0), scalar or ``[N]``.
        space: the box.
        remove_com: zero total momentum at init (default: periodic boxes); see
            :class:`~controlmd.dynamics.base.MomentumIntegrator`.

    Example::

        >>> import torch
        >>> from controlmd.potentials import HarmonicTrap
        >>> nve = NVE(HarmonicTrap(1.0), dt=0.01)
        >>> s = nve.init(torch.ones(1, 1, 1, dtype=torch.float64), P=torch.zeros(1, 1, 1, dtype=torch.float64))
        >>> with torch.no_grad():
        ...     for _ in range(314):
        ...         s = nve.step(s)
        >>> round(float(s.R), 3)  # half a period of the unit oscillator
        -1.0
    """

    def init(
        self,
        R: Tensor,
        *,
        kT: Schedule | None = None,
        rng: ReplicaRNG | None = None,
        P: Tensor | None = None,
    ) -> State:
        """Initial state at ``t = 0``: positions ``[B, N, d]`` and momenta ``P`` or drawn
        from the Maxwell–Boltzmann distribution at ``kT`` with ``rng``."""
        return self._init_state(R, kT, rng, P)

    def step(self, state: State) -> State:
        R, P, t = state.R, state.P, state.t
        F = state.aux.get("force")
        if F is None:
            F = self.force(R, t + self.t_eps)
        t1 = t + self.dt
        h = 0.5 * self.dt
        P = torch.add(P, F, alpha=h)  # type: ignore[arg-type]
        R = self.space.shift(R, P * self.drift_factor(R))
        F = self.force(R, t1 - self.t_eps)
        P = torch.add(P, F, alpha=h)
        return state.replace(R=R, P=P, t=t1, step=state.step + 1, aux={**state.aux, "force": F})

    def invariant(self, state: State) -> Tensor:
        """Conserved quantity ``K + E`` per replica ``[B]`` (for time-independent E)."""
        return self.energy(state)

    def ode_state(self, state: State) -> tuple[Tensor, ...]:
        """``(q, p)`` for torchdiffeq."""
        return (state.R, state.P)  # type: ignore[return-value]

    def vector_field(self, t: Tensor, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Hamilton's equations ``(p / m, F(q, t))``."""
        R, P = y
        return (P / self.mass_like(R), self.force(R, t))

    def from_ode_state(self, y: tuple[Tensor, ...], t: Tensor, template: State) -> State:
        """State at time ``t`` from ``(q, p)`` (positions wrapped into the box)."""
        R, P = y
        aux = {k: v for k, v in template.aux.items() if k != "force"}
        return template.replace(R=self.space.wrap(R), P=P, t=t, aux=aux)

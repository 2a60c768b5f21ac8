"""Microcanonical (NVE) dynamics: velocity Verlet for ``H = sum p^2/2m + E(q, t)``.

One step (``F_n = F(q_n, t_n)`` cached from the previous step)::

    p_{n+1/2} = p_n + dt/2 F_n
    q_{n+1}   = q_n + dt p_{n+1/2} / m          (wrapped by space.shift)
    p_{n+1}   = p_{n+1/2} + dt/2 F(q_{n+1}, t_{n+1})

(time-dependent terms as one-sided limits inside the step, see
:data:`~controlmd.dynamics.base.CONTROL_TIME_OFFSET`).

Work (``track_work=True``, ``aux["work"]`` ``[B]``): the energy change at the control
updates at fixed phase-space point, summed: a jump at ``t_n`` at ``q_n``,
``E(q_n, t_n^+) - E(q_n, t_n^-)``, the change over the step at the midpoint of the drift
``q' = q_n + dt/2 p_{n+1/2}/m``, ``E(q', t_{n+1}^-) - E(q', t_n^+)``, and a closing jump at
``t_{n+1}`` (see :mod:`controlmd.dynamics.langevin`). Per trajectory ``W = Delta(K + E) + W_shadow`` with
an O(dt^2) shadow work (the integrator's energy error); ``aux["heat"]`` stays zero.

Symplectic and time-reversible for time-independent E; the energy error is bounded and
scales as dt^2. The same Hamiltonian vector field ``(dq/dt, dp/dt) = (p/m, F(q, t))`` is
exposed for torchdiffeq (:func:`~controlmd.simulate.simulate_ode`).

Units: reduced LJ units (length sigma, energy epsilon, mass m, time tau).

Reference: Swope, Andersen, Berens, Wilson, J. Chem. Phys. 76, 637 (1982).
"""

from __future__ import annotations

import torch

from controlmd.dynamics.base import MomentumIntegrator, Schedule, State, add_to
from controlmd.potentials.base import Potential
from controlmd.rng import ReplicaRNG
from controlmd.space import Space

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
        track_work: accumulate the protocol work in ``state.aux["work"]`` ``[B]`` (and a zero
            ``aux["heat"]``: no bath); module docstring.

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

    def __init__(
        self,
        potential: Potential,
        *,
        dt: float,
        mass: float | Tensor = 1.0,
        space: Space | None = None,
        remove_com: bool | None = None,
        track_work: bool = False,
    ) -> None:
        super().__init__(potential, dt=dt, mass=mass, space=space, remove_com=remove_com)
        self.track_work = bool(track_work)

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
        aux = dict(state.aux)
        if self.track_work:
            aux = add_to(aux, "work", self.opening_jump_work(R, t))
        t1 = t + self.dt
        h = 0.5 * self.dt
        P = torch.add(P, F, alpha=h)  # type: ignore[arg-type]
        if self.track_work:
            aux = add_to(aux, "work", self._drift_work(R, P, t))
        R = self.space.shift(R, P * self.drift_factor(R))
        F = self.force(R, t1 - self.t_eps)
        if self.track_work:
            aux = add_to(aux, "work", self.closing_jump_work(R, t1))
        P = torch.add(P, F, alpha=h)
        aux["force"] = F
        return state.replace(R=R, P=P, t=t1, step=state.step + 1, aux=aux)

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

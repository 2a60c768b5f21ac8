"""Canonical (NVT) dynamics with a Nosé–Hoover chain thermostat.

Equations of motion (Martyna, Klein, Tuckerman 1992), chain of length ``M`` with
positions ``xi_j``, momenta ``p_j`` and masses ``Q_j`` per replica::

    dq/dt   = p / m
    dp/dt   = F(q, t) - (p_1 / Q_1) p
    dxi_j/dt = p_j / Q_j
    dp_1/dt = (2 K - n_dof kT) - p_1 p_2 / Q_2
    dp_j/dt = (p_{j-1}^2 / Q_{j-1} - kT) - p_j p_{j+1} / Q_{j+1}     (1 < j < M)
    dp_M/dt = p_{M-1}^2 / Q_{M-1} - kT

with conserved extended energy (for constant kT and time-independent E)::

    H_ext = K + E(q) + sum_j p_j^2 / (2 Q_j) + n_dof kT xi_1 + kT sum_{j>1} xi_j.

Integrator (Martyna, Tuckerman, Tobias, Klein 1996; the scheme of JAX MD's
``nvt_nose_hoover``): a half step of the chain, a velocity-Verlet step, a half step of the
chain. Each chain half step is split into ``chain_steps`` x ``sy_steps`` substeps with
Suzuki–Yoshida weights. Masses: ``Q_1 = n_dof kT tau^2``, ``Q_j = kT tau^2`` with kT at
``t = 0``; ``tau`` is the thermostat's time scale.

The continuous equations above are exposed as ``vector_field`` for torchdiffeq (an ODE
in ``(q, p, xi, p_xi, Q)``, ``Q`` constant), so the adjoint method applies to NVT runs.

Work and heat (``track_work=True``): the protocol work is counted as for NVE (control
updates at fixed phase-space point: a jump at ``t_n`` at ``q_n``, the change over the
step at the midpoint of the drift, a closing jump at ``t_{n+1}``); the heat is the kinetic energy the
chain half steps remove, ``Q += K_before - K_after``. Per trajectory
``W = Delta(K + E) + Q + W_shadow`` with an O(dt^2) shadow work.

Degrees of freedom: ``n_dof = d N - d`` when the centre-of-mass momentum is removed
(default in periodic boxes), else ``d N`` (see
:class:`~controlmd.dynamics.base.MomentumIntegrator`).

Units: reduced LJ units; kT is an energy, tau a time.

References:
    G. J. Martyna, M. L. Klein, M. Tuckerman, J. Chem. Phys. 97, 2635 (1992).
    G. J. Martyna, M. E. Tuckerman, D. J. Tobias, M. L. Klein, Mol. Phys. 87, 1117 (1996).
"""

from __future__ import annotations

import torch

from controlmd._validation import check_choice, check_int, check_positions, check_positive
from controlmd.dynamics.base import (
    MomentumIntegrator,
    Schedule,
    State,
    add_to,
    check_schedule,
    evaluate_schedule,
    kinetic_energy,
)
from controlmd.potentials.base import Potential
from controlmd.rng import ReplicaRNG
from controlmd.space import Space

Tensor = torch.Tensor

__all__ = ["SUZUKI_YOSHIDA_WEIGHTS", "NoseHooverChain"]


def _sy_weights() -> dict[int, tuple[float, ...]]:
    w3 = 1.0 / (2.0 - 2.0 ** (1.0 / 3.0))
    w5 = 1.0 / (4.0 - 4.0 ** (1.0 / 3.0))
    w7 = (0.784513610477560, 0.235573213359357, -1.17767998417887)
    w7_0 = 1.0 - 2.0 * sum(w7)
    return {
        1: (1.0,),
        3: (w3, 1.0 - 2.0 * w3, w3),
        5: (w5, w5, 1.0 - 4.0 * w5, w5, w5),
        7: (w7[0], w7[1], w7[2], w7_0, w7[2], w7[1], w7[0]),
    }


SUZUKI_YOSHIDA_WEIGHTS = _sy_weights()
"""Suzuki–Yoshida weights of orders 1, 3, 5, 7 (each sums to 1)."""


class NoseHooverChain(MomentumIntegrator):
    """Nosé–Hoover chain NVT dynamics, batched over replicas.

    Args:
        potential: the energy ``E(q, t)``.
        dt: time step (> 0).
        kT: target temperature as an energy (> 0), constant or a schedule ``kT(t)``.
        mass: particle mass (> 0), scalar or ``[N]``.
        space: the box.
        chain_length: ``M`` (>= 1) thermostats in the chain.
        chain_steps: substeps of each chain half step (>= 1).
        sy_steps: Suzuki–Yoshida order, one of 1, 3, 5, 7.
        tau: thermostat time scale (> 0); default ``100 dt``.
        remove_com: zero total momentum at init (default: periodic boxes).
        track_work: accumulate the protocol work in ``state.aux["work"]`` and the energy
            taken by the thermostat in ``state.aux["heat"]`` (``[B]`` each).

    State ``aux``: ``force`` ``[B, N, d]``, chain ``xi``, ``p_xi`` and masses ``Q``
    ``[B, M]``.
    """

    def __init__(
        self,
        potential: Potential,
        *,
        dt: float,
        kT: Schedule,
        mass: float | Tensor = 1.0,
        space: Space | None = None,
        chain_length: int = 3,
        chain_steps: int = 1,
        sy_steps: int = 3,
        tau: float | None = None,
        remove_com: bool | None = None,
        track_work: bool = False,
    ) -> None:
        super().__init__(potential, dt=dt, mass=mass, space=space, remove_com=remove_com)
        self.track_work = bool(track_work)
        check_schedule("kT", kT)
        check_int("chain_length", chain_length)
        check_int("chain_steps", chain_steps)
        check_choice("sy_steps", str(sy_steps), [str(k) for k in SUZUKI_YOSHIDA_WEIGHTS])
        tau = 100.0 * self.dt if tau is None else tau
        check_positive("tau", tau)
        self.kT = kT
        self.chain_length = chain_length
        self.chain_steps = chain_steps
        self.sy_steps = sy_steps
        self.tau = float(tau)
        self._substeps = [w / chain_steps for w in SUZUKI_YOSHIDA_WEIGHTS[sy_steps]] * chain_steps

    def init(
        self,
        R: Tensor,
        *,
        kT: Schedule | None = None,
        rng: ReplicaRNG | None = None,
        P: Tensor | None = None,
    ) -> State:
        """Initial state at ``t = 0``; momenta ``P`` given, or drawn at ``kT`` (default:
        the thermostat's kT at ``t = 0``) with ``rng``; chain at rest."""
        check_positions("R", R)
        t0 = torch.zeros((), dtype=torch.float64)
        kT0 = evaluate_schedule(self.kT, t0).to(R)
        B, M = R.shape[0], self.chain_length
        scale = kT0.reshape(-1, 1) * self.tau**2 * torch.ones(B, M, dtype=R.dtype, device=R.device)
        Q = torch.cat([scale[:, :1] * self.n_dof(R), scale[:, 1:]], dim=1)
        zeros = R.new_zeros(B, M)
        aux = {"xi": zeros, "p_xi": zeros.clone(), "Q": Q}
        return self._init_state(R, self.kT if kT is None else kT, rng, P, aux)

    def step(self, state: State) -> State:
        R, P, t = state.R, state.P, state.t
        assert P is not None
        m = self.mass_like(R)
        n_dof = self.n_dof(R)
        t0, t1 = t + self.t_eps, t + self.dt - self.t_eps  # one-sided, inside the step
        F = state.aux.get("force")
        if F is None:
            F = self.force(R, t0)
        aux = dict(state.aux)
        track = self.track_work
        if track:
            aux = add_to(aux, "work", self.opening_jump_work(R, t))
            K_start = kinetic_energy(P, m)
        Q = state.aux["Q"]
        xi, p_xi = state.aux["xi"], state.aux["p_xi"]
        P, xi, p_xi = self._half_step_chain(
            P, m, xi, p_xi, Q, evaluate_schedule(self.kT, t0), n_dof
        )
        if track:
            heat = K_start - kinetic_energy(P, m)
        P = torch.add(P, F, alpha=0.5 * self.dt)
        if track:
            aux = add_to(aux, "work", self._drift_work(R, P, t))
        R = self.space.shift(R, P * self.drift_factor(R))
        F = self.force(R, t1)
        P = torch.add(P, F, alpha=0.5 * self.dt)
        if track:
            K_mid = kinetic_energy(P, m)
        P, xi, p_xi = self._half_step_chain(
            P, m, xi, p_xi, Q, evaluate_schedule(self.kT, t1), n_dof
        )
        t1 = t + self.dt
        if track:
            aux = add_to(aux, "heat", heat + K_mid - kinetic_energy(P, m))
            aux = add_to(aux, "work", self.closing_jump_work(R, t1))
        aux.update(force=F, xi=xi, p_xi=p_xi)
        return state.replace(R=R, P=P, t=t1, step=state.step + 1, aux=aux)

    def _half_step_chain(
        self, P: Tensor, m: Tensor, xi: Tensor, p_xi: Tensor, Q: Tensor, kT: Tensor, n_dof: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``exp(iL_NHC dt/2)``: Trotter/Suzuki–Yoshida propagation of the chain and the
        resulting scaling of the particle momenta (Martyna et al. 1996, Sec. 5)."""
        M = self.chain_length
        kT = kT.to(P).reshape(-1) if kT.ndim else kT.to(P)
        K2 = 2.0 * kinetic_energy(P, m)  # [B], twice the kinetic energy
        Qs = [Q[:, j] for j in range(M)]
        v = [p_xi[:, j] / Qs[j] for j in range(M)]
        x = [xi[:, j] for j in range(M)]
        scale = torch.ones_like(K2)
        h = 0.5 * self.dt

        def G(j: int) -> Tensor:
            if j == 0:
                return (K2 - n_dof * kT) / Qs[0]
            return (Qs[j - 1] * v[j - 1] * v[j - 1] - kT) / Qs[j]

        for w in self._substeps:
            d = w * h
            d2, d4 = 0.5 * d, 0.25 * d
            v[M - 1] = v[M - 1] + d2 * G(M - 1)
            for j in range(M - 2, -1, -1):
                s = torch.exp(-d4 * v[j + 1])
                v[j] = (v[j] * s + d2 * G(j)) * s
            x = [x[j] + d * v[j] for j in range(M)]
            s0 = torch.exp(-d * v[0])
            scale = scale * s0
            K2 = K2 * s0 * s0
            for j in range(M - 1):
                s = torch.exp(-d4 * v[j + 1])
                v[j] = (v[j] * s + d2 * G(j)) * s
            v[M - 1] = v[M - 1] + d2 * G(M - 1)
        P = P * scale.view(-1, 1, 1)
        p_xi = torch.stack([v[j] * Qs[j] for j in range(M)], dim=1)
        return P, torch.stack(x, dim=1), p_xi

    def invariant(self, state: State) -> Tensor:
        """Extended energy ``H_ext`` per replica ``[B]`` (conserved for constant kT and
        time-independent E)."""
        xi, p_xi, Q = state.aux["xi"], state.aux["p_xi"], state.aux["Q"]
        kT = evaluate_schedule(self.kT, state.t).to(state.R)
        kT = kT.reshape(-1) if kT.ndim else kT
        chain = (p_xi * p_xi / (2.0 * Q)).sum(-1) + kT * (
            self.n_dof(state.R) * xi[:, 0] + xi[:, 1:].sum(-1)
        )
        return self.energy(state) + chain

    def ode_state(self, state: State) -> tuple[Tensor, ...]:
        """``(q, p, xi, p_xi, Q)`` for torchdiffeq."""
        a = state.aux
        return (state.R, state.P, a["xi"], a["p_xi"], a["Q"])  # type: ignore[return-value]

    def vector_field(self, t: Tensor, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The continuous NHC equations of motion (module docstring); ``dQ/dt = 0``."""
        R, P, _, p_xi, Q = y
        m = self.mass_like(R)
        kT = evaluate_schedule(self.kT, t).to(R)
        kT = kT.reshape(-1, 1) if kT.ndim else kT
        v = p_xi / Q
        dP = self.force(R, t) - v[:, :1, None] * P
        K2 = 2.0 * kinetic_energy(P, m)
        G = torch.cat(
            [(K2 - self.n_dof(R) * kT.reshape(-1)).reshape(-1, 1), p_xi[:, :-1] * v[:, :-1] - kT],
            dim=1,
        )
        coupling = p_xi * torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
        return (P / m, dP, v, G - coupling, torch.zeros_like(Q))

    def from_ode_state(self, y: tuple[Tensor, ...], t: Tensor, template: State) -> State:
        R, P, xi, p_xi, Q = y
        aux = {**template.aux, "xi": xi, "p_xi": p_xi, "Q": Q}
        aux.pop("force", None)
        return template.replace(R=self.space.wrap(R), P=P, t=t, aux=aux)

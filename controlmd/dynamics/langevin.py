"""Underdamped Langevin dynamics with the BAOAB splitting.

Equations of motion: ``dq = p/m dt``, ``dp = F(q, t) dt - gamma p dt + sqrt(2 gamma m kT) dW``
with ``gamma`` the collision rate (1/time). One BAOAB step (Leimkuhler & Matthews)::

    B: p += dt/2 F(q_n, t_n)                       (F cached from the previous step)
    A: q += dt/2 p/m
    O: p  = c p + sqrt((1 - c^2) m kT(t_n + dt/2)) xi,   c = exp(-gamma dt)
    A: q += dt/2 p/m
    B: p += dt/2 F(q_{n+1}, t_{n+1})

Controls: the first B reads ``u(t_n^+)`` (the cached force, refreshed by ``simulate`` at a
jump), the last ``u(t_{n+1}^-)`` (:data:`~controlmd.dynamics.base.CONTROL_TIME_OFFSET`).

Work and heat (``track_work=True``; ``aux["work"]``, ``aux["heat"]`` ``[B]``). The work of
a time-dependent ``H`` is the energy change at the control updates, at fixed phase-space
point, summed: a jump at ``t_n`` at ``q_n``, ``E(q_n, t_n^+) - E(q_n, t_n^-)``, and the
change over the step, ``E(q', t_{n+1}^-) - E(q', t_n^+)``, at the midpoint of the drift
``q' = q_n + dt/2 p/m`` (where the O step acts; the dynamics are the same wherever in the
drift the control switches, and the midpoint makes the work second order in dt); a
closing jump (:func:`~controlmd.dynamics.base.closing_jumps`) at ``t_{n+1}`` is added at
``q_{n+1}``. The heat released to the bath is the kinetic energy removed by the O steps,
``Q += K_before - K_after``. Per trajectory ``W = Delta(K + E) + Q + W_shadow``, where the
shadow work (the energy change of the deterministic B and A substeps) is O(dt^2)
(tested). These are the protocol work and heat of Sivak, Chodera & Crooks, PRX 3,
011007 (2013), the splitting read as ``B A [control update] O A B``.

BAOAB samples configurations with O(dt^2) error and is exact for free particles' momenta.
Noise comes from each replica's own generator (``state.rng``), so replica ``i`` of a batch
seeded ``s`` reproduces a one-replica run seeded ``replica_seed(s, i)``.

Degrees of freedom: friction and noise do not conserve total momentum, so the stationary
kinetic energy is ``d N kT / 2`` (``n_dof = d N``) whatever the initial momenta.

Units: reduced LJ units; kT an energy, gamma a rate (1/tau).

Reference: B. Leimkuhler, C. Matthews, Appl. Math. Res. Express 2013, 34 (2013).
"""

from __future__ import annotations

import torch

from controlmd._validation import check_positive
from controlmd.dynamics.base import (
    MomentumIntegrator,
    Schedule,
    State,
    add_to,
    check_schedule,
    evaluate_schedule,
    kinetic_energy,
    per_replica,
)
from controlmd.errors import ControlMDError
from controlmd.potentials.base import Potential
from controlmd.rng import ReplicaRNG
from controlmd.space import Space

Tensor = torch.Tensor

__all__ = ["Langevin"]


class Langevin(MomentumIntegrator):
    """Langevin BAOAB, batched over replicas.

    Args:
        potential: the energy ``E(q, t)``.
        dt: time step (> 0).
        kT: bath temperature as an energy (>= 0; 0 is the deterministic damped dynamics
            ``dp = F dt - gamma p dt``), constant or a schedule ``kT(t)`` (evaluated at the
            O step, ``t_n + dt/2``).
        gamma: collision rate (> 0), scalar or per particle ``[N]``.
        mass: particle mass (> 0), scalar or ``[N]``.
        space: the box.
        remove_com: zero total momentum at init (default: periodic boxes).
        track_work: accumulate the protocol work in ``state.aux["work"]`` and the heat
            released to the bath in ``state.aux["heat"]`` (``[B]`` each; module docstring).
    """

    stochastic = True
    _gamma: Tensor  # buffer: collision rate, [] or [N]

    def __init__(
        self,
        potential: Potential,
        *,
        dt: float,
        kT: Schedule,
        gamma: float | Tensor = 1.0,
        mass: float | Tensor = 1.0,
        space: Space | None = None,
        remove_com: bool | None = None,
        track_work: bool = False,
    ) -> None:
        super().__init__(potential, dt=dt, mass=mass, space=space, remove_com=remove_com)
        self.track_work = bool(track_work)
        check_schedule("kT", kT, allow_zero=True)
        check_positive("gamma", gamma)
        self.kT = kT
        g = torch.as_tensor(gamma, dtype=torch.float64)
        if g.ndim > 1:
            raise ControlMDError(f"gamma must be a scalar or [N], got shape {tuple(g.shape)}")
        self.register_buffer("_gamma", g, persistent=False)

    def n_dof(self, R: Tensor) -> int:
        """``d N``: the thermostat acts on every momentum component."""
        return R.shape[-2] * R.shape[-1]

    def control_schedules(self) -> dict[str, tuple[Schedule, bool]]:
        return {"kT": (self.kT, True)}

    def init(
        self,
        R: Tensor,
        *,
        kT: Schedule | None = None,
        rng: ReplicaRNG | None = None,
        P: Tensor | None = None,
    ) -> State:
        """Initial state at ``t = 0``; momenta ``P`` given or drawn at ``kT`` (default: the
        bath's kT at ``t = 0``); ``rng`` is required (the noise of every step)."""
        if rng is None:
            raise ControlMDError(
                "Langevin dynamics draws noise: pass rng=ReplicaRNG(seed, B) to init"
            )
        if self._gamma.ndim == 1 and R.ndim == 3 and self._gamma.shape[0] != R.shape[1]:
            raise ControlMDError(
                f"gamma has {self._gamma.shape[0]} entries but R has N = {R.shape[1]} particles"
            )
        return self._init_state(R, self.kT if kT is None else kT, rng, P)

    def step(self, state: State) -> State:
        R, P, t = state.R, state.P, state.t
        assert P is not None
        m = self.mass_like(R)
        c = self._damping_like(R)
        F = state.aux.get("force")
        if F is None:
            F = self.force(R, t + self.t_eps)
        aux = dict(state.aux)
        if self.track_work:
            aux = add_to(aux, "work", self.opening_jump_work(R, t))
        h = 0.5 * self.dt
        P = P + h * F
        R = self.space.shift(R, h * P / m)
        if self.track_work:  # the control update, at the midpoint of the drift
            dW = self.potential.energy(R, t + self.dt - self.t_eps)
            aux = add_to(aux, "work", dW - self.potential.energy(R, t + self.t_eps))
        xi = state.rng.randn(*R.shape[1:], dtype=R.dtype).to(R.device)  # type: ignore[union-attr]
        K_before = kinetic_energy(P, m) if self.track_work else None
        P = c * P + self._noise_scale(R, t + h) * xi
        if K_before is not None:
            aux = add_to(aux, "heat", K_before - kinetic_energy(P, m))
        R = self.space.shift(R, h * P / m)
        t1 = t + self.dt
        F = self.force(R, t1 - self.t_eps)
        if self.track_work:
            aux = add_to(aux, "work", self.closing_jump_work(R, t1))
        P = P + h * F
        aux["force"] = F
        return state.replace(R=R, P=P, t=t1, step=state.step + 1, aux=aux)

    def _damping_like(self, R: Tensor) -> Tensor:
        """``c = exp(-gamma dt)`` broadcastable against ``R`` (``[]`` or ``[1, N, 1]``),
        computed once per dtype and device, not at every step, unless ``gamma`` requires grad;
        read-only (a ``gamma`` changed in place through ``.data`` is not seen)."""
        g = self._gamma
        if g.requires_grad:  # a cached value would hold this call's graph
            g = g.to(R)
            return torch.exp(-(g.view(1, -1, 1) if g.ndim == 1 else g) * self.dt)
        key = (R.dtype, R.device, self.dt, g.data_ptr(), g._version)
        hit = self.__dict__.get("_damping")
        if hit is None or hit[0] != key:
            g = g.to(R)
            hit = self.__dict__["_damping"] = (
                key,
                torch.exp(-(g.view(1, -1, 1) if g.ndim == 1 else g) * self.dt),
            )
        return hit[1]

    def _noise_scale(self, R: Tensor, t: Tensor) -> Tensor:
        """The O step's noise amplitude ``sqrt((1 - c^2) m kT(t))`` broadcastable against
        ``R``; cached like :meth:`_damping_like` when ``kT`` is a number."""
        c, m = self._damping_like(R), self.mass_like(R)
        if not isinstance(self.kT, int | float) or c.requires_grad or m.requires_grad:
            kT = per_replica(evaluate_schedule(self.kT, t), R)
            return torch.sqrt((1.0 - c * c) * m * kT)
        key = (c, m, self.kT)
        hit = self.__dict__.get("_noise")
        if hit is None or hit[0][0] is not c or hit[0][1] is not m or hit[0][2] != self.kT:
            kT = per_replica(evaluate_schedule(self.kT, t), R)
            hit = self.__dict__["_noise"] = (key, torch.sqrt((1.0 - c * c) * m * kT))
        return hit[1]

    def score_step(self, state: State) -> tuple[State, Tensor]:
        """One BAOAB step along a fixed position path, for the score-function estimator.

        The step draws the same noise as :meth:`step` and reaches the same positions
        ``R_{n+1}``, which are returned detached: the path is the sequence of positions, whose
        density under the protocol is a product of Gaussians. Given ``(R_n, P_n)``, ``R_{n+1}
        = R_n + h/m [(1 + c) P' + s xi]`` with ``P' = P_n + h F(R_n, t_n)``, ``h = dt/2``,
        ``c = exp(-gamma dt)``, ``s = sqrt((1 - c^2) m kT(t_n + h))``, so (up to a constant)

            log p(R_{n+1} | R_n, P_n; theta) = -sum [xi^2 / 2 + log s],
            xi = ((R_{n+1} - R_n) m/h - (1 + c) P') / s.

        The momenta are a deterministic function of the position path,
        ``P_{n+1} = (R_{n+1} - R_n) m/h - P' + h F(R_{n+1}, t_{n+1})``, and keep their explicit
        dependence on the protocol (through the forces and ``kT``); so does the log-density.

        :param state: the state at ``t_n`` (its ``R`` is used detached).
        :return: the next state (``R`` detached, ``P`` and the cached force with the protocol's
            graph) and the log-density ``[B]`` of its positions given ``state``.
        """
        R, P, t = state.R.detach(), state.P, state.t
        assert P is not None
        m = self.mass_like(R)
        g = self._gamma.to(R)
        c = torch.exp(-(g.view(1, -1, 1) if g.ndim == 1 else g) * self.dt)
        F = state.aux.get("force")
        if F is None:
            F = self.force(R, t + self.t_eps)
        h = 0.5 * self.dt
        P_half = P + h * F
        kT = per_replica(evaluate_schedule(self.kT, t + h), R)
        s = torch.sqrt((1.0 - c * c) * m * kT)
        R_a = self.space.shift(R, h * P_half.detach() / m)
        xi = state.rng.randn(*R.shape[1:], dtype=R.dtype).to(R.device)  # type: ignore[union-attr]
        P_o = c * P_half.detach() + s.detach() * xi
        R1 = self.space.shift(R_a, h * P_o / m)
        # the same quantities as functions of the protocol at fixed R_n, R_{n+1}
        P_o = self.space.displacement(R1, R) * (m / h) - P_half
        z = (P_o - c * P_half) / s
        log_p = -(0.5 * z * z + torch.log(s).expand_as(z)).sum(dim=(-2, -1))
        t1 = t + self.dt
        if any(p.requires_grad for p in self.potential.parameters()):
            F1 = self.force(R1, t1 - self.t_eps)
        else:  # the force does not depend on the protocol: keep no graph of it
            with torch.no_grad():
                F1 = self.force(R1, t1 - self.t_eps)
        P1 = P_o + h * F1
        next_state = state.replace(
            R=R1, P=P1, t=t1, step=state.step + 1, aux={**state.aux, "force": F1}
        )
        return next_state, log_p

"""Dragging a Brownian particle with a harmonic trap at minimal mean work.

The validation task of the trainer: its optimum is known in closed form (Schmiedl &
Seifert, PRL 98, 108301 (2007)).

System
    One overdamped Brownian particle in 1-D (``R`` ``[B, 1, 1]``), mobility ``mu``,
    temperature ``kT``, in the trap ``V(x; lambda) = k/2 (x - lambda)^2``. Dynamics:
    :class:`~controlmd.dynamics.brownian.Brownian` with the exact Ornstein–Uhlenbeck step
    (default; no time-step error for piecewise-constant lambda) or Euler–Maruyama.
    Horizon ``t_f`` in ``n_steps`` steps of ``dt = t_f / n_steps``.

Control channels
    =====  ===========  ===========================  ============================  =====
    index  coupling     min                          max                           unit
    =====  ===========  ===========================  ============================  =====
    0      trap centre  ``min(0, lambda_f) - 2 s``   ``max(0, lambda_f) + 2 s``    sigma
    =====  ===========  ===========================  ============================  =====

    with ``s = max(|lambda_f|, sqrt(kT/k))`` (override with ``low`` / ``high``). The
    boundary values ``lambda(0-) = 0`` and ``lambda(t_f+) = lambda_f`` are fixed by the
    task; the protocol is free on ``(0, t_f)``, so jumps at both ends are representable.
    Step ``n`` (from ``t_{n-1}`` to ``t_n``) holds ``lambda_n = u((n - 1/2) dt)``, the
    protocol at the step's midpoint; a feedback protocol sets
    ``lambda_n = u((n - 1/2) dt, x_{n-1})`` from the position at the step's start.

Observation (feedback protocols, gymnasium env)
    =====  ===================  ===========  =====
    index  quantity             range        unit
    =====  ===================  ===========  =====
    0      particle position x  (-inf, inf)  sigma
    =====  ===================  ===========  =====

Outcome
    Surrogate loss: mean of the work ``W`` over the training replicas. Exact metric: the
    work of each replica, ``W = sum_{n=0}^{N} [V(x_n; lambda_{n+1}) - V(x_n; lambda_n)]``
    with ``lambda_0 = 0`` and ``lambda_{N+1} = lambda_f`` (both jumps included); the
    reported value is its mean (lower is better). For open-loop protocols
    :meth:`TrapDrag.exact_metric` gives the mean work exactly from the mean dynamics
    (the position variance does not depend on lambda in a harmonic trap).
    Optimum (continuous time): ``lambda*(t) = lambda_f (1 + mu k t) / (2 + mu k t_f)`` on
    ``(0, t_f)``, jumps of ``lambda_f / (2 + mu k t_f)`` at both ends,
    ``W* = k lambda_f^2 / (2 + mu k t_f)`` (25/3 for lambda_f = 5, t_f = mu = k = 1,
    where the linear protocol gives 25/e = 9.197). Feedback protocols can do better than
    ``W*``, which bounds open-loop control only.

Starting state
    ``x_0 ~ N(0, kT / k)`` (equilibrium in the trap at 0), replica ``i`` drawing from the
    stream ``replica_seed(seed, first_replica + i)``.

Episode end
    Truncation at ``t_f`` (``n_steps`` steps); no termination. The final jump to
    ``lambda_f`` is added to the work by the last step (the closing jump of
    :class:`~controlmd.protocols.Endpoints`).

Units
    Reduced units: length sigma, energy epsilon (kT in epsilon), time tau; mobility in
    sigma^2 / (epsilon tau), stiffness in epsilon / sigma^2.

Arguments
    =========  =====  ==========  ====================================================
    name       type   default     effect
    =========  =====  ==========  ====================================================
    lambda_f   float  5.0         final trap position
    t_f        float  1.0         duration (> 0)
    mu         float  1.0         mobility (> 0)
    k          float  1.0         trap stiffness (> 0)
    kT         float  1.0         temperature (> 0)
    n_steps    int    100         time steps N (>= 1)
    method     str    "exact_ou"  "exact_ou" or "euler_maruyama" (needs mu k dt < 2)
    low, high  float  see above   bounds of the trap centre
    =========  =====  ==========  ====================================================

Version history
    v0: initial version.
    v0 (same numbers): the boundary values are a public
    :class:`~controlmd.protocols.Endpoints`; the dynamics count both jumps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from controlmd._validation import check_choice, check_int, check_positive
from controlmd.dynamics.base import Integrator, IntegratorWrapper, State
from controlmd.dynamics.brownian import Brownian
from controlmd.errors import ControlMDError
from controlmd.potentials.external import HarmonicTrap
from controlmd.protocols import Endpoints, Protocol
from controlmd.rng import ReplicaRNG
from controlmd.tasks.base import ControlChannels, Task, TaskCapabilities
from controlmd.tasks.registry import register_task

Tensor = torch.Tensor

__all__ = ["TrapDrag"]


@register_task
class TrapDrag(Task[State]):
    """Move a harmonic trap from 0 to ``lambda_f`` in time ``t_f`` at minimal mean work.

    See the module docstring for the system, channels, outcome and arguments.

    Example:
        >>> from controlmd.protocols import make_protocol
        >>> task = TrapDrag(lambda_f=5.0, t_f=1.0, n_steps=100)
        >>> round(task.extras()["optimum"], 4)
        8.3333
        >>> linear = make_protocol("chebyshev", dim=1, t_final=1.0, degree=1, init=[0.0, 5.0])
        >>> round(task.exact_metric(linear), 3)
        9.197
    """

    name = "trap_drag"
    metric_name = "mean_work"
    higher_is_better = False
    units = "reduced units: length sigma, energy epsilon (kT), time tau"
    capabilities = TaskCapabilities(estimators=("pathwise", "score", "forward"))

    def __init__(
        self,
        *,
        lambda_f: float = 5.0,
        t_f: float = 1.0,
        mu: float = 1.0,
        k: float = 1.0,
        kT: float = 1.0,
        n_steps: int = 100,
        method: str = "exact_ou",
        low: float | None = None,
        high: float | None = None,
    ) -> None:
        for name, value in (("lambda_f", lambda_f), ("low", low), ("high", high)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ControlMDError(f"{name} must be a finite number, got {value!r}")
        check_positive("t_f", t_f)
        check_positive("mu", mu)
        check_positive("k", k)
        check_positive("kT", kT)
        check_int("n_steps", n_steps)
        check_choice("method", method, ["exact_ou", "euler_maruyama"])
        self.lambda_f = float(lambda_f)
        self.t_f = float(t_f)
        self.mu = float(mu)
        self.k = float(k)
        self.kT = float(kT)
        self.n_steps = n_steps
        self.dt = self.t_f / n_steps
        self.method = method
        if method == "euler_maruyama" and self.mu * self.k * self.dt >= 2.0:
            raise ControlMDError(
                f"euler_maruyama is unstable for mu k dt >= 2, got {self.mu * self.k * self.dt:g}; "
                "increase n_steps or use method = 'exact_ou'"
            )
        scale = max(abs(self.lambda_f), math.sqrt(self.kT / self.k))
        lo = min(0.0, self.lambda_f) - 2.0 * scale if low is None else float(low)
        hi = max(0.0, self.lambda_f) + 2.0 * scale if high is None else float(high)
        self.controls = ControlChannels(("trap_center",), (lo,), (hi,), ("sigma",))
        self._init_dynamics = Brownian(
            HarmonicTrap(self.k, 0.0),
            dt=self.dt,
            kT=self.kT,
            gamma=1.0 / self.mu,
            method=self.method,
            track_work=True,
        )
        self._discrete_optimum: tuple[float, Tensor] | None = None

    # ------------------------------------------------------------------ Task interface

    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> State:
        rng = ReplicaRNG(seed, n_replicas, first_replica=first_replica)
        x0 = math.sqrt(self.kT / self.k) * rng.randn(1, 1)
        return self._init_dynamics.init(x0, rng=rng)

    def integrator(self, protocol: Protocol) -> Integrator:
        center = _TrapCenter(protocol, dt=self.dt)
        # lambda(0-) = 0 and lambda(t_f+) = lambda_f: both jumps are counted as work by
        # Brownian (the closing one by the last step)
        ends = Endpoints(center, initial=0.0, final=self.lambda_f, dim=1, t_final=self.t_f)
        inner = Brownian(
            HarmonicTrap(self.k, ends),
            dt=self.dt,
            kT=self.kT,
            gamma=1.0 / self.mu,
            method=self.method,
            track_work=True,
        )
        return _FeedbackHold(inner, center) if protocol.feedback else inner

    def loss(self, state: State) -> Tensor:
        return state.aux["work"].mean()

    def metric(self, state: State) -> Tensor:
        return state.aux["work"].detach()

    def observe(self, state: State) -> Tensor:
        return state.R[:, :, 0]

    def extras(self) -> dict[str, Any]:
        W_discrete, _ = self.discrete_optimum()
        return {
            "optimum": self.optimal_work(),
            "optimum_discrete": W_discrete,
            "optimum_reference": "Schmiedl & Seifert, PRL 98, 108301 (2007): W* = k lambda_f^2 / (2 + mu k t_f)",
            "linear_protocol_work": self.linear_work(),
            "lambda_f": self.lambda_f,
            "t_f": self.t_f,
            "mu": self.mu,
            "k": self.k,
            "kT": self.kT,
            "dt": self.dt,
            "integration_method": self.method,
        }

    # ------------------------------------------------------------------ analytic results

    def optimal_work(self) -> float:
        """``W* = k lambda_f^2 / (2 + mu k t_f)`` (continuous time, open loop)."""
        return self.k * self.lambda_f**2 / (2.0 + self.mu * self.k * self.t_f)

    def optimal_protocol(self, t: Tensor) -> Tensor:
        """``lambda*(t) = lambda_f (1 + mu k t) / (2 + mu k t_f)`` on ``(0, t_f)``: ``[T]`` -> ``[T, 1]``."""
        g = self.mu * self.k
        return (self.lambda_f * (1.0 + g * t) / (2.0 + g * self.t_f)).unsqueeze(-1)

    def linear_work(self) -> float:
        """Mean work of ``lambda(t) = lambda_f t / t_f`` in continuous time."""
        g = self.mu * self.k
        return (
            self.lambda_f**2
            / (self.mu * self.t_f**2)
            * (self.t_f - (1.0 - math.exp(-g * self.t_f)) / g)
        )

    def reference_protocol(self) -> tuple[Tensor, Tensor]:
        """``(t, lambda*)`` table with the boundary values, for plots."""
        t = torch.linspace(0.0, self.t_f, 200, dtype=torch.float64)
        u = self.optimal_protocol(t)
        t = torch.cat([t[:1], t, t[-1:]])
        u = torch.cat(
            [
                torch.zeros(1, 1, dtype=torch.float64),
                u,
                torch.full((1, 1), self.lambda_f, dtype=torch.float64),
            ]
        )
        return t, u

    def step_centers(self, protocol: Protocol) -> Tensor:
        """``lambda_1 .. lambda_N`` ``[N]`` held during the steps (open-loop protocols)."""
        t_mid = (torch.arange(self.n_steps, dtype=torch.float64) + 0.5) * self.dt
        return protocol(t_mid)[:, 0].to(torch.float64)

    def mean_work(self, centers: Tensor) -> Tensor:
        """Exact mean work of the discrete dynamics holding ``centers`` ``[N]`` (differentiable).

        The mean position follows ``m -> c + (m - c) a`` (exact OU, ``a = exp(-mu k dt)``)
        or ``m -> m + mu k (c - m) dt`` (Euler–Maruyama); the variance does not depend on
        the centres, so ``<V(x; c') - V(x; c)> = k/2 [(c' - m)^2 - (c - m)^2]``.
        """
        zero = centers.new_zeros(1)
        lam = torch.cat([zero, centers, zero + self.lambda_f])
        g = self.mu * self.k
        a = math.exp(-g * self.dt) if self.method == "exact_ou" else 1.0 - g * self.dt
        n = torch.arange(self.n_steps, dtype=torch.float64)
        powers = torch.tril(a ** (n[:, None] - n[None, :]).clamp(min=0.0))
        m = torch.cat([zero, (1.0 - a) * (powers.to(centers) @ centers)])  # mean before each change
        return 0.5 * self.k * ((lam[1:] - m) ** 2 - (lam[:-1] - m) ** 2).sum()

    def exact_metric(self, protocol: Protocol) -> float | None:
        """Exact mean work of an open-loop protocol (``None`` for feedback protocols)."""
        if protocol.feedback:
            return None
        with torch.no_grad():
            return float(self.mean_work(self.step_centers(protocol)))

    def discrete_optimum(self) -> tuple[float, Tensor]:
        """Minimal exact mean work over all step centres ``[N]`` of this discretization.

        ``mean_work`` is quadratic in the centres: one Newton step from zero is exact.
        """
        if self._discrete_optimum is None:
            c0 = torch.zeros(self.n_steps, dtype=torch.float64)
            H = torch.autograd.functional.hessian(self.mean_work, c0)
            (g,) = torch.autograd.grad(self.mean_work(c0.requires_grad_(True)), c0)
            c = torch.linalg.solve(H, -g)
            with torch.no_grad():
                self._discrete_optimum = (float(self.mean_work(c)), c)
        return self._discrete_optimum


class _TrapCenter(nn.Module):
    """Trap centre on ``[0, t_f]`` seen by the dynamics at integrator time ``t``.

    With ``n`` the step nearest to ``t / dt``: the protocol at the midpoint ``(n - 1/2) dt``
    of the step ending at ``n dt`` (the dynamics read ``t_n -+ eps``; the boundary values
    come from :class:`~controlmd.protocols.Endpoints`). For feedback protocols the dynamics
    hold the per-replica values of the current step (:meth:`hold`).
    """

    def __init__(self, protocol: Protocol, *, dt: float) -> None:
        super().__init__()
        self.protocol = protocol
        self.dt = dt
        self._held: tuple[float, Tensor, Tensor] | None = None

    @property
    def pure_in_time(self) -> bool:
        """Whether :meth:`forward` depends on ``t`` and the protocol alone (no held
        feedback values): see :mod:`controlmd.potentials.control_memo`."""
        return self._held is None

    def hold(self, t_start: Tensor, previous: Tensor, current: Tensor) -> None:
        """Feedback: centre ``previous`` ``[B, 1]`` at ``t_start``, ``current`` after it."""
        self._held = (float(t_start), previous, current)

    def forward(self, t: Tensor) -> Tensor:
        t_value = float(t)
        if self._held is not None:
            t_start, previous, current = self._held
            return previous if t_value < t_start + 0.5 * self.dt else current
        n = math.floor(t_value / self.dt + 0.5)  # the step ending at n dt
        # scalar_tensor: the same 0-d tensor as torch.tensor(...), one operation instead of four
        return self.protocol(torch.scalar_tensor((n - 0.5) * self.dt, dtype=torch.float64))


class _FeedbackHold(IntegratorWrapper):
    """Brownian dynamics of the trap under a feedback protocol: before each step, the
    centre ``lambda_n = u((n + 1/2) dt, x_n)`` is computed per replica and held."""

    def __init__(self, inner: Brownian, center: _TrapCenter) -> None:
        super().__init__(inner)
        self.center = center

    def step(self, state: State) -> State:
        B = state.n_replicas
        previous = state.aux.get("trap_center", state.R.new_zeros(B, 1))
        n = round(float(state.t) / self.dt)
        t_mid = torch.tensor((n + 0.5) * self.dt, dtype=torch.float64)
        current = self.center.protocol(t_mid, obs=state.R[:, :, 0]).to(state.R)
        self.center.hold(state.t, previous, current)
        new = self.inner.step(state)
        new.aux["trap_center"] = current
        return new

"""Dragging a particle with a harmonic trap from 0 to lambda_f in time t_f at minimal mean
work: overdamped (Schmiedl & Seifert, PRL 98, 108301 (2007)) and underdamped
(Gomez-Marin, Schmiedl & Seifert, J. Chem. Phys. 129, 024114 (2008)).

System: x in 1-D, E(x, t) = k/2 (x - lambda(t))^2; the trap centre lambda(t) is the
control on (0, t_f), with lambda = 0 before t = 0 and lambda_f after t_f (both jumps
count as work). x(0) (and p(0)) from equilibrium in the trap at 0. Outcome: mean work.
Units: reduced (length sigma, energy epsilon, time tau).
"""

from __future__ import annotations

import math

import torch

from controlmd import Brownian, Endpoints, HarmonicTrap, Langevin, Protocol, ReplicaRNG, State
from controlmd.tasks import ControlChannels, Task, TaskCapabilities


class _Drag(Task[State]):
    """What both versions share: the trap, its bounds, the work as loss and metric."""

    metric_name = "mean_work"
    higher_is_better = False
    units = "reduced units: length sigma, energy epsilon, time tau"

    def __init__(self, *, lambda_f: float, t_f: float, k: float, kT: float, n_steps: int) -> None:
        self.lambda_f, self.t_f, self.k, self.kT = lambda_f, t_f, k, kT
        self.n_steps = n_steps
        self.dt = t_f / n_steps
        span = abs(lambda_f) + 2.0
        self.controls = ControlChannels(("trap_center",), (-span,), (span,), ("sigma",))

    def trap(self, protocol: Protocol) -> HarmonicTrap:
        return HarmonicTrap(self.k, Endpoints(protocol, initial=0.0, final=self.lambda_f))

    def loss(self, state: State) -> torch.Tensor:
        return state.aux["work"].mean()

    def metric(self, state: State) -> torch.Tensor:
        return state.aux["work"].detach()


class OverdampedDrag(_Drag):
    """dx = -mu k (x - lambda) dt + sqrt(2 kT mu) dW, exact Ornstein–Uhlenbeck steps."""

    name = "overdamped_drag"
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
    ) -> None:
        super().__init__(lambda_f=lambda_f, t_f=t_f, k=k, kT=kT, n_steps=n_steps)
        self.mu = mu

    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> State:
        rng = ReplicaRNG(seed, n_replicas, first_replica=first_replica)
        return State(R=math.sqrt(self.kT / self.k) * rng.randn(1, 1), rng=rng)

    def integrator(self, protocol: Protocol) -> Brownian:
        return Brownian(
            self.trap(protocol),
            dt=self.dt,
            kT=self.kT,
            gamma=1.0 / self.mu,
            method="exact_ou",
            track_work=True,
        )

    def exact_metric(self, protocol: Protocol) -> float | None:
        """The work is linear in x, so its mean follows the mean <x>: step n sets
        lambda_n = lambda(t_{n+1}^-) (work -k (lambda_n - lambda_{n-1}) (<x> - their
        mean)), then <x> <- lambda_n + (<x> - lambda_n) exp(-mu k dt)."""
        if protocol.feedback:
            return None
        t = torch.arange(1, self.n_steps + 1, dtype=torch.float64) * self.dt - 1e-6 * self.dt
        with torch.no_grad():
            lams = protocol(t)[:, 0].tolist()
        a = math.exp(-self.mu * self.k * self.dt)
        x, previous, work = 0.0, 0.0, 0.0
        for lam in [*lams, self.lambda_f]:  # the last change is the closing jump
            work -= self.k * (lam - previous) * (x - 0.5 * (lam + previous))
            x, previous = lam + (x - lam) * a, lam
        return work

    def optimal_work(self) -> float:
        """W* = k lambda_f^2 / (2 + mu k t_f) in continuous time (Schmiedl & Seifert)."""
        return self.k * self.lambda_f**2 / (2.0 + self.mu * self.k * self.t_f)

    def optimal_protocol(self, t: torch.Tensor) -> torch.Tensor:
        """lambda*(t) = lambda_f (1 + mu k t) / (2 + mu k t_f) on (0, t_f): [T] -> [T, 1]."""
        g = self.mu * self.k
        return (self.lambda_f * (1.0 + g * t) / (2.0 + g * self.t_f)).unsqueeze(-1)


class UnderdampedDrag(_Drag):
    """dx = p/m dt, dp = -k (x - lambda) dt - gamma p dt + sqrt(2 gamma m kT) dW (BAOAB)."""

    name = "underdamped_drag"

    def __init__(
        self,
        *,
        lambda_f: float = 5.0,
        t_f: float = 1.0,
        m: float = 1.0,
        gamma: float = 1.0,
        k: float = 1.0,
        kT: float = 1.0,
        n_steps: int = 100,
    ) -> None:
        super().__init__(lambda_f=lambda_f, t_f=t_f, k=k, kT=kT, n_steps=n_steps)
        self.m, self.gamma = m, gamma

    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> State:
        rng = ReplicaRNG(seed, n_replicas, first_replica=first_replica)
        x0 = math.sqrt(self.kT / self.k) * rng.randn(1, 1)
        p0 = math.sqrt(self.m * self.kT) * rng.randn(1, 1)
        return State(R=x0, P=p0, rng=rng)

    def integrator(self, protocol: Protocol, *, kT: float | None = None) -> Langevin:
        return Langevin(
            self.trap(protocol),
            dt=self.dt,
            kT=self.kT if kT is None else kT,
            gamma=self.gamma,
            mass=self.m,
            track_work=True,
        )

    def exact_metric(self, protocol: Protocol) -> float | None:
        """Linear dynamics, work linear in x: the mean work is the work of the noise-free
        (kT = 0) trajectory from the mean initial state x = p = 0."""
        if protocol.feedback:
            return None
        from controlmd import simulate

        dynamics = self.integrator(protocol, kT=0.0)
        zero = torch.zeros(1, 1, 1, dtype=torch.float64)
        start = State(R=zero, P=zero.clone(), rng=ReplicaRNG(0, 1))
        final = simulate(dynamics, start, self.n_steps, gradient="none").final
        return float(final.aux["work"][0])

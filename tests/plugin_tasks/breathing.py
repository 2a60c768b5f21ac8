"""A breathing harmonic trap: change the stiffness of the trap holding an overdamped
particle from k_i to k_f in time t_f, at minimal mean work.

System: x in 1-D, E(x, t) = k(t) x^2 / 2, dx = -mu k x dt + sqrt(2 kT mu) dW, x(0) drawn
from equilibrium in the trap k_i. Control: the stiffness k(t) on (0, t_f), with
k = k_i before t = 0 and k = k_f after t_f (jumps at both ends count as work).
Outcome: the mean work W (lower is better). Units: reduced (length sigma, energy kT's
unit epsilon, time tau).
"""

from __future__ import annotations

import math

import torch

from controlmd import Brownian, Endpoints, HarmonicTrap, Protocol, ReplicaRNG, State
from controlmd.tasks import ControlChannels, Task, TaskCapabilities


class BreathingTrap(Task[State]):
    name = "breathing_trap"
    metric_name = "mean_work"
    higher_is_better = False
    units = "reduced units: length sigma, energy epsilon, time tau"
    capabilities = TaskCapabilities(estimators=("pathwise", "score", "forward"))

    def __init__(
        self,
        *,
        k_i: float = 1.0,
        k_f: float = 4.0,
        t_f: float = 1.0,
        mu: float = 1.0,
        kT: float = 1.0,
        n_steps: int = 50,
    ) -> None:
        self.k_i, self.k_f, self.t_f, self.mu, self.kT = k_i, k_f, t_f, mu, kT
        self.n_steps = n_steps
        self.dt = t_f / n_steps
        low, high = 0.2 * min(k_i, k_f), 3.0 * max(k_i, k_f)
        self.controls = ControlChannels(("stiffness",), (low,), (high,), ("epsilon/sigma^2",))

    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> State:
        rng = ReplicaRNG(seed, n_replicas, first_replica=first_replica)
        x0 = math.sqrt(self.kT / self.k_i) * rng.randn(1, 1)  # [B, 1, 1], equilibrium
        return State(R=x0, rng=rng)

    def integrator(self, protocol: Protocol) -> Brownian:
        stiffness = Endpoints(protocol, initial=self.k_i, final=self.k_f)
        return Brownian(
            HarmonicTrap(stiffness),
            dt=self.dt,
            kT=self.kT,
            gamma=1.0 / self.mu,
            method="exact_ou",
            track_work=True,
        )

    def loss(self, state: State) -> torch.Tensor:
        return state.aux["work"].mean()

    def metric(self, state: State) -> torch.Tensor:
        return state.aux["work"].detach()

    def exact_metric(self, protocol: Protocol) -> float | None:
        """Mean work from the variance v = <x^2> (exact for the exact OU step): step n
        first sets k_n = k(t_{n+1}^-) (work (k_n - k_{n-1}) v / 2), then
        v <- v a^2 + kT / k_n (1 - a^2) with a = exp(-mu k_n dt)."""
        if protocol.feedback:
            return None
        eps = 1e-6 * self.dt
        t = torch.arange(1, self.n_steps + 1, dtype=torch.float64) * self.dt - eps
        with torch.no_grad():
            ks = protocol(t)[:, 0].tolist()
        v, k_prev, work = self.kT / self.k_i, self.k_i, 0.0
        for k in ks:
            work += 0.5 * (k - k_prev) * v
            a2 = math.exp(-2.0 * self.mu * k * self.dt)
            v, k_prev = v * a2 + self.kT / k * (1.0 - a2), k
        return work + 0.5 * (self.k_f - k_prev) * v

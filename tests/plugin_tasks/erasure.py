"""Erasing a bit stored in an underdamped particle in a double well with a time-dependent
barrier and tilt (after Dago, Pereda, Barros, Ciliberto & Bellon, PRL 126, 170601 (2021)).

System: x in 1-D, E(x, t) = b(t) (x^2 - 1)^2 - f(t) x, Langevin dynamics (BAOAB) of mass m,
friction gamma, at kT. Controls: barrier height b(t) and tilt f(t) on (0, t_f), with
(b, f) = (b_0, 0) before t = 0 and after t_f (a cycle: Delta F = 0). The bit (the well,
sign of x) starts random, from equilibrium; erasure puts every particle in the right well.
Outcome: the mean work (Landauer: >= kT ln 2 for a complete erasure); the success rate is
``erased(state)``. Units: reduced (length sigma, energy epsilon, time tau).
"""

from __future__ import annotations

import math

import torch

from controlmd import Endpoints, Langevin, Potential, Protocol, ReplicaRNG, State
from controlmd.tasks import ControlChannels, Task


class ControlledDoubleWell(Potential):
    """E = b (x^2 - 1)^2 - f x of the first coordinate, with (b, f) = u(t), per replica
    ``[B]`` (``R`` ``[B, 1, 1]``)."""

    def __init__(self, control: torch.nn.Module) -> None:
        super().__init__()
        self.control = control

    def energy(self, R: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        u = self.control(torch.as_tensor(t, dtype=torch.float64)).to(R)
        b, f = u[..., 0], u[..., 1]
        x = R[:, 0, 0]
        return b * (x * x - 1.0) ** 2 - f * x


class BitErasure(Task[State]):
    name = "bit_erasure"
    metric_name = "mean_work"
    higher_is_better = False
    units = "reduced units: length sigma, energy epsilon, time tau"

    def __init__(
        self,
        *,
        b0: float = 3.0,
        t_f: float = 4.0,
        m: float = 1.0,
        gamma: float = 2.0,
        kT: float = 1.0,
        n_steps: int = 400,
    ) -> None:
        self.b0, self.t_f, self.m, self.gamma, self.kT = b0, t_f, m, gamma, kT
        self.n_steps = n_steps
        self.dt = t_f / n_steps
        self.controls = ControlChannels(
            ("barrier", "tilt"),
            (0.0, -4.0 * b0),
            (2.0 * b0, 4.0 * b0),
            ("epsilon", "epsilon/sigma"),
        )

    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> State:
        """x from exp(-E(x; b0, 0) / kT) exactly (inverse CDF on a fine grid), p from
        Maxwell–Boltzmann."""
        rng = ReplicaRNG(seed, n_replicas, first_replica=first_replica)
        grid = torch.linspace(-2.5, 2.5, 20001, dtype=torch.float64)
        weight = torch.exp(-self.b0 * (grid * grid - 1.0) ** 2 / self.kT)
        cdf = torch.cumsum(weight, 0)
        cdf = cdf / cdf[-1]
        uniform = rng.rand(1, 1).reshape(-1)
        i = torch.searchsorted(cdf, uniform).clamp(1, grid.numel() - 1)
        w = (uniform - cdf[i - 1]) / (cdf[i] - cdf[i - 1])
        x0 = grid[i - 1] + w * (grid[i] - grid[i - 1])
        p0 = math.sqrt(self.m * self.kT) * rng.randn(1, 1)
        return State(R=x0.reshape(-1, 1, 1), P=p0, rng=rng)

    def integrator(self, protocol: Protocol) -> Langevin:
        control = Endpoints(protocol, initial=[self.b0, 0.0], final=[self.b0, 0.0])
        return Langevin(
            ControlledDoubleWell(control),
            dt=self.dt,
            kT=self.kT,
            gamma=self.gamma,
            mass=self.m,
            track_work=True,
        )

    def loss(self, state: State) -> torch.Tensor:
        return state.aux["work"].mean()

    def metric(self, state: State) -> torch.Tensor:
        return state.aux["work"].detach()

    def erased(self, state: State) -> torch.Tensor:
        """Whether each replica ends in the right well ``[B]`` (bool)."""
        return state.R[:, 0, 0] > 0

"""The Task: what both the gradient trainer and the gymnasium env consume.

A Task bundles a system (seeded batched initial states, H0, dynamics, time step, horizon),
control channels (how u(t) in R^k enters, with physical bounds), a differentiable
surrogate loss for training and the exact metric that is reported. Nothing task-specific
lives in the trainer or the env.

Writing a task: subclass :class:`Task`, set the class attributes, implement
``initial_state``, ``integrator``, ``loss`` and ``metric``; register it with
``@register_task``. Tasks whose state is not particles (the quantum isomerization task)
override ``advance`` (and may override ``rollout`` with a faster exact path).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from controlmd._validation import check_choice
from controlmd.dynamics.base import Integrator, State
from controlmd.errors import ControlMDError
from controlmd.protocols import Protocol

Tensor = torch.Tensor

__all__ = ["ControlChannels", "Task", "get_task", "register_task", "task_names"]


@dataclass(frozen=True)
class ControlChannels:
    """The control inputs of a task.

    Attributes:
        names: one name per channel, e.g. ``("trap_center",)``.
        low, high: physical bounds ``[k]``.
        units: unit of each channel, e.g. ``("sigma",)``.
    """

    names: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    units: tuple[str, ...]

    def __post_init__(self) -> None:
        k = len(self.names)
        for field_name in ("low", "high", "units"):
            if len(getattr(self, field_name)) != k:
                raise ControlMDError(
                    f"control channels: {field_name} has {len(getattr(self, field_name))} "
                    f"entries for {k} channel names"
                )
        for name, lo, hi in zip(self.names, self.low, self.high):
            if not lo < hi:
                raise ControlMDError(
                    f"control channel {name!r}: bounds need low < high, got [{lo}, {hi}]"
                )

    @property
    def dim(self) -> int:
        return len(self.names)

    def low_tensor(self) -> Tensor:
        return torch.tensor(self.low, dtype=torch.float64)

    def high_tensor(self) -> Tensor:
        return torch.tensor(self.high, dtype=torch.float64)


class Task(ABC):
    """Base class of benchmark tasks.

    Class attributes:
        name: registry key (used in TOML ``[task] name = ...``).
        metric_name: name of the exact metric, e.g. ``"mean_work"``.
        higher_is_better: direction of the metric.
        units: one line stating the unit system.
        replica_mean_loss: whether ``loss`` is the mean over replicas of a per-replica term
            (default ``True``). The distributed trainer averages the ranks' losses, which
            equals the loss of the whole batch only then; a task whose loss couples replicas
            (a function of an ensemble average) sets it ``False`` and trains on one process.

    Instance attributes (set by subclasses' ``__init__``):
        controls: :class:`ControlChannels`.
        dt: time step.
        n_steps: steps per episode; the horizon is ``dt * n_steps``.
    """

    name: ClassVar[str]
    metric_name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    units: ClassVar[str]
    replica_mean_loss: ClassVar[bool] = True

    controls: ControlChannels
    dt: float
    n_steps: int

    @property
    def horizon(self) -> float:
        return self.dt * self.n_steps

    @abstractmethod
    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> State:
        """Seeded initial states of ``n_replicas`` replicas.

        Replica ``i`` uses the stream ``replica_seed(seed, first_replica + i)`` (see
        :mod:`controlmd.rng`), so a batch's replicas do not depend on its size.
        """

    @abstractmethod
    def integrator(self, protocol: Protocol) -> Integrator:
        """The dynamics with control ``u = protocol(t)`` entering the Hamiltonian."""

    @abstractmethod
    def loss(self, state: State) -> Tensor:
        """Differentiable surrogate loss of final states (0-d, mean over replicas; minimized)."""

    @abstractmethod
    def metric(self, state: State) -> Tensor:
        """Exact metric of each replica's final state ``[B]`` (no gradient); the reported
        value is its mean."""

    def observe(self, state: State) -> Tensor:
        """Task features for feedback control ``[B, n_features]`` (default: none)."""
        return torch.zeros(state.n_replicas, 0, dtype=torch.float64)

    def make_protocol_bounds(self) -> tuple[Tensor, Tensor]:
        return self.controls.low_tensor(), self.controls.high_tensor()

    def advance(
        self, state: State, protocol: Protocol, n_steps: int, **simulate_options: Any
    ) -> State:
        """Integrate ``n_steps`` steps under ``protocol`` (the env calls this per action)."""
        from controlmd.simulate import simulate

        return simulate(self.integrator(protocol), state, n_steps, **simulate_options).final

    def rollout(
        self,
        protocol: Protocol,
        n_replicas: int,
        seed: int,
        *,
        first_replica: int = 0,
        **simulate_options: Any,
    ) -> State:
        """A full episode from fresh initial states; returns final states."""
        state = self.initial_state(n_replicas, seed, first_replica=first_replica)
        return self.advance(state, protocol, self.n_steps, **simulate_options)

    def extras(self) -> dict[str, Any]:
        """Task-specific entries for ``metrics.json`` (e.g. a known optimum)."""
        return {}


_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task constructible by name from configs."""
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **params: Any) -> Task:
    """Build a registered task; an unknown name lists the valid ones."""
    check_choice("task", name, list(_TASKS))
    return _TASKS[name](**params)

"""The Task contract: what both the gradient trainer and the gymnasium env consume.

A task bundles a **system** (seeded batched initial states, H0, dynamics, time step,
horizon), **control channels** (how u(t) in R^k enters, with physical bounds), a
differentiable **surrogate loss** for training and the **exact metric** that is reported.
Nothing task-specific lives in the trainer, the CLI or the env: every hook they call is
declared here, typed, with a default where it is optional.

=========================  ========  =====================================================
hook                       required  used by
=========================  ========  =====================================================
``initial_state``          yes       trainer, evaluation, env reset
``integrator``             yes       ``advance`` (particle tasks)
``loss``                   yes       trainer (minimized; never reported)
``metric``                 yes       evaluation, env reward, compare (the reported number)
``observe``                no        feedback protocols, env observations
``advance`` / ``rollout``  no        env steps / trainer and evaluation
``default_control``        no        the no-control value: release windows, ``eval
                                     --baseline constant``, constant sweeps
``exact_metric``           no        noise-free metric of a protocol (trap_drag)
``check_protocol``         no        config, trainer: refuse a protocol the task cannot use
``max_field``              no        ``eval``: the largest |V| a protocol's field allows
``reference_protocol``     no        a known optimum drawn beside trained protocols
``parameters``             no        learning tasks' own trainable Hamiltonian
``state_dict`` / ``load``  no        checkpoints of a task's own trainable state
``finish_run``             no        task files and figures after the final evaluation
``extras``                 no        task entries of ``metrics.json``
=========================  ========  =====================================================

What a task supports is declared as data in :attr:`Task.capabilities` (gradient
estimators, the adjoint path, whether a gymnasium env can act on it).

Writing a task: subclass ``Task[State]``, set the class attributes, implement the four
required hooks, and either decorate it with :func:`~controlmd.tasks.registry.register_task`
or name it as ``module:Class`` in an experiment file (docs/extending.md walks through one).
Tasks whose state is not particles (the quantum isomerization task) use their own state
type, ``Task[QuantumState]``, and override ``advance`` (and may override ``rollout`` with a
faster exact path).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar
from typing import Protocol as TypingProtocol

import torch
from torch import nn

from controlmd.dynamics.base import Integrator, State
from controlmd.errors import ControlMDError
from controlmd.protocols import Protocol

if TYPE_CHECKING:
    from controlmd.logger import Logger

Tensor = torch.Tensor

__all__ = ["BatchedState", "ControlChannels", "StateT", "Task", "TaskCapabilities"]


class BatchedState(TypingProtocol):
    """What every task state has: a number of replicas (the leading batch dimension)."""

    @property
    def n_replicas(self) -> int: ...


StateT = TypeVar("StateT", bound=BatchedState)
"""The state type a task simulates (:class:`~controlmd.dynamics.State` for particles)."""

ESTIMATOR_NAMES = ("pathwise", "score", "forward")


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
        for field_name, values in (("low", self.low), ("high", self.high), ("units", self.units)):
            if len(values) != k:
                raise ControlMDError(
                    f"control channels: {field_name} has {len(values)} entries for {k} channel names"
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


@dataclass(frozen=True)
class TaskCapabilities:
    """What a task supports, declared as data (checked by the trainer and the env).

    Attributes:
        estimators: gradient estimators the trainer may use (``pathwise``, ``score``,
            ``forward``); ``score`` also needs the dynamics it is implemented for.
        adjoint: whether ``gradient = "adjoint"`` applies (deterministic ODE dynamics).
        env: whether a gymnasium env can act on the task (it has control channels).
        deterministic: every replica follows the same dynamics from the same start (no
            noise, no random initial state), so one replica is the whole ensemble.
    """

    estimators: tuple[str, ...] = ("pathwise", "forward")
    adjoint: bool = False
    env: bool = True
    deterministic: bool = False

    def __post_init__(self) -> None:
        unknown = [e for e in self.estimators if e not in ESTIMATOR_NAMES]
        if unknown:
            raise ControlMDError(
                f"capabilities.estimators: unknown {unknown}; expected names from {ESTIMATOR_NAMES}"
            )


class Task(ABC, Generic[StateT]):
    """Base class of tasks (see the module docstring for the hooks).

    Class attributes:
        name: registry key (used in TOML ``[task] name = ...``).
        metric_name: name of the exact metric, e.g. ``"mean_work"``.
        higher_is_better: direction of the metric.
        units: one line stating the unit system.
        replica_mean_loss: whether ``loss`` is the mean over replicas of a per-replica term
            (default ``True``). The distributed trainer averages the ranks' losses, which
            equals the loss of the whole batch only then; a task whose loss couples replicas
            (a function of an ensemble average) sets it ``False`` and trains on one process.
        capabilities: :class:`TaskCapabilities`.

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
    capabilities: ClassVar[TaskCapabilities] = TaskCapabilities()

    controls: ControlChannels
    dt: float
    n_steps: int

    @property
    def horizon(self) -> float:
        return self.dt * self.n_steps

    # ------------------------------------------------------------------ required

    @abstractmethod
    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> StateT:
        """Seeded initial states of ``n_replicas`` replicas.

        Replica ``i`` uses the stream ``replica_seed(seed, first_replica + i)`` (see
        :mod:`controlmd.rng`), so a batch's replicas do not depend on its size.
        """

    @abstractmethod
    def integrator(self, protocol: Protocol) -> Integrator:
        """The dynamics with control ``u = protocol(t)`` entering the Hamiltonian."""

    @abstractmethod
    def loss(self, state: StateT) -> Tensor:
        """Differentiable surrogate loss of final states (0-d, mean over replicas; minimized)."""

    @abstractmethod
    def metric(self, state: StateT) -> Tensor:
        """Exact metric of each replica's final state ``[B]`` (no gradient); the reported
        value is its mean."""

    # ------------------------------------------------------------------ optional

    def observe(self, state: StateT) -> Tensor:
        """Task features for feedback control ``[B, n_features]`` (default: none)."""
        return torch.zeros(state.n_replicas, 0, dtype=torch.float64)

    def make_protocol_bounds(self) -> tuple[Tensor, Tensor]:
        return self.controls.low_tensor(), self.controls.high_tensor()

    def advance(
        self, state: StateT, protocol: Protocol, n_steps: int, **simulate_options: Any
    ) -> StateT:
        """Integrate ``n_steps`` steps under ``protocol`` (the env calls this per action).

        The default simulates the :meth:`integrator` with :func:`controlmd.simulate` (or
        :class:`~controlmd.dynamics.fused.FusedSteps` under ``[experiment] fused_steps``:
        :func:`~controlmd.simulate.final_state`); tasks whose state is not a particle
        :class:`~controlmd.dynamics.State` override it.
        """
        from controlmd.simulate import final_state

        if not isinstance(state, State):
            raise ControlMDError(
                f"task {self.name!r}: the default advance() simulates particle States; a task "
                f"with {type(state).__name__} states overrides advance()"
            )
        final: Any = final_state(self.integrator(protocol), state, n_steps, **simulate_options)
        return final  # type: ignore[no-any-return]

    def rollout(
        self,
        protocol: Protocol,
        n_replicas: int,
        seed: int,
        *,
        first_replica: int = 0,
        **simulate_options: Any,
    ) -> StateT:
        """A full episode from fresh initial states; returns final states."""
        state = self.initial_state(n_replicas, seed, first_replica=first_replica)
        return self.advance(state, protocol, self.n_steps, **simulate_options)

    def check_protocol(self, protocol: Protocol) -> None:
        """Raise :class:`~controlmd.errors.ControlMDError` unless ``protocol`` has this
        task's number of control channels and its horizon; tasks with more requirements
        (e.g. a spatial field channel that needs a field protocol) extend it, calling
        ``super().check_protocol(protocol)`` first."""
        if protocol.dim != self.controls.dim:
            raise ControlMDError(
                f"dim = {protocol.dim} but task {self.name!r} has {self.controls.dim} "
                "control channel(s)"
            )
        if not math.isclose(protocol.t_final, self.horizon, rel_tol=1e-9):
            raise ControlMDError(
                f"t_final = {protocol.t_final} differs from task {self.name!r}'s horizon "
                f"{self.horizon}"
            )

    def default_control(self) -> Tensor | None:
        """The channel values ``[k]`` that mean "no control" (H0 as built), or ``None`` when
        the task has no such value. Release windows switch every channel to it, and
        ``controlmd eval --baseline constant`` scores it."""
        return None

    def exact_metric(self, protocol: Protocol) -> float | None:
        """The noise-free metric of ``protocol`` where the task can compute it (default:
        ``None``)."""
        return None

    def max_field(self, protocol: Protocol) -> float | None:
        """The largest ``|V|`` (energy units) the spatial control field of ``protocol``
        can reach, or ``None`` when the task has no spatial field."""
        return None

    def reference_protocol(self) -> tuple[Tensor, Tensor] | None:
        """A known reference (e.g. the optimum) as ``(times [n], values [n, k])``, drawn
        beside trained protocols; ``None`` when there is none."""
        return None

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the task owns (a learning task's Hamiltonian), optimized
        together with the protocol's; default none."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """The task's own trainable state for checkpoints (default: empty)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the default task has no state to restore."""
        if state:
            raise ControlMDError(
                f"task {self.name!r} keeps no state, but the checkpoint holds {sorted(state)}"
            )

    def finish_run(
        self, run_dir: str | Path, logger: Logger | None = None, step: int = 0
    ) -> dict[str, Any]:
        """Called once after the final evaluation of a training run: write task-specific
        files and figures into ``run_dir`` (figures also to ``logger``); returns a
        JSON-serialisable summary of what was written or evaluated (default: nothing)."""
        return {}

    def extras(self) -> dict[str, Any]:
        """Task-specific entries for ``metrics.json`` (e.g. a known optimum)."""
        return {}

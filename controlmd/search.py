"""Derivative-free protocol search: CMA-ES and random search over piecewise-constant protocols.

The searched variable is the matrix of normalized piece values ``x`` ``[K, k]`` in
``[-1, 1]``, mapped to the task's physical bounds by
``u = low + (high - low) (x + 1) / 2``, exactly as the gymnasium env maps its actions: a
``K``-piece protocol here and a ``K``-step episode of the env control the same thing.
``x = 0`` (the middle of the bounds) is the starting point, as for a fresh RL policy and a
freshly built :class:`~controlmd.protocols.PiecewiseConstant`. With ``release_fraction``
every candidate also has the release window (the task's no-control value on the last
fraction of the horizon), as the trainer's protocols of the field experiments do.

Each candidate is scored by the task's exact metric, averaged over ``replicas`` fresh
replicas; all candidates of one generation share the batch seed ``seed + generation``
(common random numbers), so they are ranked on the same noise. Budgets are counted like
the trainer's: ``md_steps`` are forward replica-steps.

CMA-ES uses the ``cma`` package (Hansen et al., https://github.com/CMA-ES/pycma), an
optional dependency imported when a :class:`CMAES` is built.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from controlmd._validation import check_int, check_positive
from controlmd.errors import ControlMDError
from controlmd.protocols import PiecewiseConstant
from controlmd.tasks.base import Task

Tensor = torch.Tensor

__all__ = [
    "CMAES",
    "PROTOCOL_MARGIN",
    "ProtocolSearch",
    "RandomSearch",
    "actions_to_protocol",
    "protocol_to_actions",
]

PROTOCOL_MARGIN = 1e-5
"""Normalized values are clipped to ``[-1 + margin, 1 - margin]`` when they become a
:class:`PiecewiseConstant` (its tanh squashing never reaches a bound, so a value on one has
no parameter; the control then differs from the bound by ``margin (high - low) / 2``)."""


def protocol_to_actions(protocol: PiecewiseConstant, task: Task) -> np.ndarray:
    """Normalized piece values ``[K, k]`` in ``[-1, 1]`` of a piecewise-constant protocol:
    ``a = 2 (u - low) / (high - low) - 1`` with the task's physical bounds."""
    t_mid = (
        (torch.arange(protocol.n_pieces, dtype=torch.float64) + 0.5)
        * protocol.t_final
        / protocol.n_pieces
    )
    with torch.no_grad():
        u = protocol(t_mid).to(torch.float64)
    low, high = task.controls.low_tensor(), task.controls.high_tensor()
    return (2.0 * (u - low) / (high - low) - 1.0).clamp(-1.0, 1.0).numpy()


def actions_to_protocol(
    actions: np.ndarray | Sequence[Sequence[float]],
    task: Task,
    *,
    release_fraction: float = 0.0,
) -> PiecewiseConstant:
    """The ``K``-piece protocol holding normalized values ``[K, k]`` (inverse of
    :func:`protocol_to_actions`), clipped to ``[-1 + m, 1 - m]`` with ``m =``
    :data:`PROTOCOL_MARGIN`: a value on or beyond a bound (CMA-ES samples the bounds
    themselves) comes within ``m (high - low) / 2`` of it. With ``release_fraction`` ``f > 0``
    every channel is the task's no-control value on the last ``f`` of the horizon (the
    release window of :class:`~controlmd.protocols.Protocol`)."""
    a = torch.as_tensor(np.asarray(actions, dtype=np.float64))
    if a.ndim != 2 or a.shape[1] != task.controls.dim:
        raise ControlMDError(
            f"actions must have shape [K, {task.controls.dim}], got {tuple(a.shape)}"
        )
    low, high = task.controls.low_tensor(), task.controls.high_tensor()
    a = a.clamp(-1.0 + PROTOCOL_MARGIN, 1.0 - PROTOCOL_MARGIN)
    u = low + (high - low) * 0.5 * (a + 1.0)
    release_value = None
    if release_fraction > 0:
        release_value = task.default_control()
        if release_value is None:
            raise ControlMDError(
                f"release_fraction = {release_fraction!r}: task {task.name!r} has no "
                "no-control value (default_control)"
            )
    return PiecewiseConstant(
        dim=task.controls.dim,
        t_final=task.horizon,
        n_pieces=a.shape[0],
        low=list(task.controls.low),
        high=list(task.controls.high),
        init=u,
        release_fraction=release_fraction,
        release_value=release_value,
    )


class ProtocolSearch(ABC):
    """Base of the derivative-free searches (SB3-like shape: construct, then :meth:`learn`).

    :param task: the task; its exact ``metric`` is the objective (maximized when
        ``higher_is_better``, else minimized).
    :param n_pieces: ``K``, pieces of the searched protocol.
    :param replicas: replicas per candidate evaluation.
    :param seed: seed of the search's own randomness and of the training batches.
    :param release_fraction: release window of every candidate (see
        :func:`actions_to_protocol`; 0: none).
    """

    def __init__(
        self,
        task: Task,
        *,
        n_pieces: int,
        replicas: int,
        seed: int = 0,
        release_fraction: float = 0.0,
    ) -> None:
        if not isinstance(task, Task):
            raise ControlMDError(f"task must be a controlmd Task, got {type(task).__name__}")
        check_int("n_pieces", n_pieces)
        check_int("replicas", replicas)
        check_int("seed", seed, minimum=0)
        if not 0.0 <= release_fraction < 0.5:
            raise ControlMDError(f"release_fraction must be in [0, 0.5), got {release_fraction!r}")
        self.task = task
        self.n_pieces = n_pieces
        self.replicas = replicas
        self.seed = seed
        self.release_fraction = release_fraction
        self.dim = n_pieces * task.controls.dim
        self.sign = 1.0 if task.higher_is_better else -1.0
        self.generation = 0
        self.md_steps = 0
        self.best_x = np.zeros(self.dim)
        self.best_score = math.inf
        self._t0 = time.perf_counter()

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._t0

    def protocol(self, x: np.ndarray) -> PiecewiseConstant:
        """The protocol of a flat candidate ``x`` ``[K k]``."""
        return actions_to_protocol(
            np.asarray(x).reshape(self.n_pieces, self.task.controls.dim),
            self.task,
            release_fraction=self.release_fraction,
        )

    def score(self, x: np.ndarray, seed: int) -> float:
        """Minimized objective ``-sign * mean metric`` of candidate ``x`` on the batch ``seed``."""
        with torch.no_grad():
            state = self.task.rollout(self.protocol(x), self.replicas, seed, gradient="none")
            values = self.task.metric(state).detach().to(torch.float64)
        self.md_steps += self.replicas * self.task.n_steps
        if not bool(torch.isfinite(values).all()):
            raise ControlMDError(
                f"task {self.task.name!r}: the metric is not finite for some replicas"
            )
        return -self.sign * float(values.mean())

    @abstractmethod
    def incumbent(self) -> PiecewiseConstant:
        """The protocol the search would return now."""

    @abstractmethod
    def step(self) -> None:
        """One generation."""

    def learn(
        self, generations: int, callback: Callable[[ProtocolSearch], bool | None] | None = None
    ) -> ProtocolSearch:
        """Run up to ``generations`` generations; ``callback(self)`` after each, ``False`` stops."""
        check_int("generations", generations, minimum=0)
        while self.generation < generations:
            self.step()
            self.generation += 1
            if callback is not None and callback(self) is False:
                break
        return self


class CMAES(ProtocolSearch):
    """CMA-ES (``cma.CMAEvolutionStrategy``) on the normalized piece values, bounded to [-1, 1].

    The incumbent is the distribution mean (``xfavorite``), the usual estimate under a
    noisy objective.

    :param sigma0: initial step size in normalized units (0 < sigma0 <= 1).
    :param popsize: candidates per generation (``None``: cma's default ``4 + 3 ln n``).
    :param task, n_pieces, replicas, seed, release_fraction: see :class:`ProtocolSearch`.
    """

    def __init__(
        self,
        task: Task,
        *,
        n_pieces: int,
        replicas: int,
        seed: int = 0,
        sigma0: float = 0.3,
        popsize: int | None = None,
        release_fraction: float = 0.0,
    ) -> None:
        super().__init__(
            task,
            n_pieces=n_pieces,
            replicas=replicas,
            seed=seed,
            release_fraction=release_fraction,
        )
        check_positive("sigma0", sigma0)
        if sigma0 > 1.0:
            raise ControlMDError(
                f"sigma0 must be <= 1 (normalized units, bounds [-1, 1]), got {sigma0}"
            )
        if popsize is not None:
            check_int("popsize", popsize, minimum=2)
        import cma

        options: dict[str, Any] = {"bounds": [-1.0, 1.0], "seed": seed + 1, "verbose": -9}
        if popsize is not None:
            options["popsize"] = popsize
        self.es = cma.CMAEvolutionStrategy(np.zeros(self.dim), sigma0, options)
        self.popsize = int(self.es.popsize)

    def step(self) -> None:
        candidates = self.es.ask()
        seed = self.seed + self.generation
        scores = [self.score(np.asarray(x), seed) for x in candidates]
        self.es.tell(candidates, scores)
        best = int(np.argmin(scores))
        if scores[best] < self.best_score:
            self.best_score, self.best_x = scores[best], np.asarray(candidates[best]).copy()

    def incumbent(self) -> PiecewiseConstant:
        return self.protocol(np.clip(np.asarray(self.es.result.xfavorite), -1.0, 1.0))


class RandomSearch(ProtocolSearch):
    """Pure random search: candidates uniform in ``[-1, 1]^(K k)``, the best one kept.

    Candidate 0 is ``x = 0`` (the common starting protocol). All candidates are scored on
    the same batch (``seed``), so they are compared on the same noise; the incumbent's
    held-out score can be worse than its training score (winner's curse).

    :param batch: candidates per generation.
    :param task, n_pieces, replicas, seed, release_fraction: see :class:`ProtocolSearch`.
    """

    def __init__(
        self,
        task: Task,
        *,
        n_pieces: int,
        replicas: int,
        seed: int = 0,
        batch: int = 8,
        release_fraction: float = 0.0,
    ) -> None:
        super().__init__(
            task,
            n_pieces=n_pieces,
            replicas=replicas,
            seed=seed,
            release_fraction=release_fraction,
        )
        check_int("batch", batch)
        self.batch = batch
        self.rng = np.random.default_rng(seed)
        self.candidates = 0

    def step(self) -> None:
        for _ in range(self.batch):
            x = (
                np.zeros(self.dim)
                if self.candidates == 0
                else self.rng.uniform(-1.0, 1.0, self.dim)
            )
            self.candidates += 1
            s = self.score(x, self.seed)
            if s < self.best_score:
                self.best_score, self.best_x = s, x

    def incumbent(self) -> PiecewiseConstant:
        return self.protocol(self.best_x)

"""Callbacks of :meth:`controlmd.trainer.Trainer.learn` (stable-baselines3's pattern).

A callback gets the trainer in :meth:`Callback.init_callback`, is told when training
starts and ends, and :meth:`Callback.on_step` runs after every iteration (returning
``False`` stops training). Evaluation, checkpoints, histograms, early stopping and the
progress bar are callbacks; so is :class:`AbortAfter`, which simulates a killed run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlmd._validation import check_int, check_positive
from controlmd.checkpoint import save_checkpoint
from controlmd.errors import ConfigError

if TYPE_CHECKING:
    from controlmd.evaluation import Evaluation
    from controlmd.trainer import Trainer

__all__ = [
    "AbortAfter",
    "Callback",
    "CallbackList",
    "CheckpointCallback",
    "EarlyStopping",
    "EvalCallback",
    "HistogramCallback",
    "ProgressBar",
    "StopOnSignal",
]


class Callback:
    """Base class; override the hooks you need."""

    trainer: Trainer

    def init_callback(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_training_start(self) -> None:
        pass

    def on_step(self) -> bool:
        """After each iteration (``trainer.iteration`` already advanced); ``False`` stops."""
        return True

    def on_training_end(self) -> None:
        pass


class CallbackList(Callback):
    """Several callbacks run in order; training stops when any returns ``False``."""

    def __init__(self, callbacks: Sequence[Callback] | Callback | None) -> None:
        if callbacks is None:
            callbacks = []
        elif isinstance(callbacks, Callback):
            callbacks = [callbacks]
        self.callbacks = list(callbacks)

    def init_callback(self, trainer: Trainer) -> None:
        super().init_callback(trainer)
        for cb in self.callbacks:
            cb.init_callback(trainer)

    def on_training_start(self) -> None:
        for cb in self.callbacks:
            cb.on_training_start()

    def on_step(self) -> bool:
        go_on = True
        for cb in self.callbacks:
            go_on = cb.on_step() is not False and go_on
        return go_on

    def on_training_end(self) -> None:
        for cb in self.callbacks:
            cb.on_training_end()


class EvalCallback(Callback):
    """Exact metric on held-out replicas every ``every`` iterations (and before training).

    Records ``outcome/metric`` and ``outcome/metric_se`` (and ``outcome/metric_exact``
    where the task has an exact evaluation). The same held-out seed is used each time, so
    successive values differ by the protocol only.

    Args:
        every: iterations between evaluations (0: only before training).
        n_replicas: replicas per evaluation.
        seed: evaluation seed (default: the trainer's held-out seed).
        chunk: replicas simulated at once.
    """

    def __init__(
        self, every: int, n_replicas: int, *, seed: int | None = None, chunk: int = 10_000
    ) -> None:
        check_int("every", every, minimum=0)
        check_int("n_replicas", n_replicas)
        self.every = every
        self.n_replicas = n_replicas
        self.seed = seed
        self.chunk = chunk
        self.last: Evaluation | None = None
        self.history: list[tuple[int, float]] = []

    def on_training_start(self) -> None:
        if self.trainer.iteration == 0:
            self._evaluate()
            self.trainer.logger.dump(0)

    def on_step(self) -> bool:
        if self.every and self.trainer.iteration % self.every == 0:
            self._evaluate()
        return True

    def _evaluate(self) -> None:
        t = self.trainer
        result = t.evaluate(self.n_replicas, self.seed, chunk=self.chunk)
        self.last = result
        self.history.append((t.iteration, result.mean))
        t.logger.record("outcome/metric", result.mean)
        t.logger.record("outcome/metric_se", result.se)
        exact = t.exact_metric()
        if exact is not None:
            t.logger.record("outcome/metric_exact", exact)
        t.logger.record("budget/md_steps", t.md_steps)
        t.logger.record("time/wall_s", t.wall_s)


class CheckpointCallback(Callback):
    """Atomic ``checkpoint.pt`` every ``every`` iterations and at the end of training.

    The logger is flushed first, so TensorBoard holds every step the checkpoint covers.

    Args:
        path: checkpoint file.
        every: iterations between checkpoints (0: only at the end).
        payload: extra entries to store (called at save time).
    """

    def __init__(
        self, path: str | Path, *, every: int, payload: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        check_int("every", every, minimum=0)
        self.path = Path(path)
        self.every = every
        self.payload = payload

    def save(self) -> None:
        """Flush the logger and write the checkpoint (also callable before training, once
        :meth:`init_callback` has run: the run's first checkpoint)."""
        t = self.trainer
        t.logger.dump(t.iteration)
        t.logger.flush()
        save_checkpoint(
            self.path, {"trainer": t.state_dict(), **(self.payload() if self.payload else {})}
        )

    def on_step(self) -> bool:
        if self.every and self.trainer.iteration % self.every == 0:
            self.save()
        return True

    def on_training_end(self) -> None:
        self.save()


class HistogramCallback(Callback):
    """Histograms of protocol parameters (``params/<name>``) and gradients (``grads/<name>``)."""

    def __init__(self, every: int) -> None:
        check_int("every", every)
        self.every = every

    def on_step(self) -> bool:
        t = self.trainer
        if t.iteration % self.every == 0 or t.iteration == 1:
            for name, p in t.protocol.named_parameters():
                t.logger.record_histogram(f"params/{name}", p.detach(), t.iteration)
                if p.grad is not None:
                    t.logger.record_histogram(f"grads/{name}", p.grad.detach(), t.iteration)
        return True


class EarlyStopping(Callback):
    """Stop when the evaluated metric has not improved by ``min_delta`` for ``patience`` evaluations.

    Args:
        evaluator: the :class:`EvalCallback` whose results are watched.
        patience: evaluations without improvement before stopping (>= 1).
        min_delta: smallest change counted as an improvement (>= 0).
    """

    def __init__(
        self, evaluator: EvalCallback, *, patience: int = 5, min_delta: float = 0.0
    ) -> None:
        check_int("patience", patience)
        check_positive("min_delta", min_delta, allow_zero=True)
        self.evaluator = evaluator
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best = math.nan
        self.bad = 0
        self._seen = 0

    def on_step(self) -> bool:
        history = self.evaluator.history
        sign = 1.0 if self.trainer.task.higher_is_better else -1.0
        for _, value in history[self._seen :]:
            if math.isnan(self.best) or sign * (value - self.best) > self.min_delta:
                self.best, self.bad = value, 0
            else:
                self.bad += 1
        self._seen = len(history)
        return self.bad < self.patience


class ProgressBar(Callback):
    """tqdm bar: iteration, loss, last evaluated metric, ETA."""

    def __init__(self, total: int, evaluator: EvalCallback | None = None) -> None:
        self.total = total
        self.evaluator = evaluator
        self.bar: Any = None

    def on_training_start(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self.total, initial=self.trainer.iteration, unit="it", dynamic_ncols=True
        )

    def on_step(self) -> bool:
        t = self.trainer
        postfix = {"loss": f"{t.last.get('loss', math.nan):.4g}"}
        if self.evaluator is not None and self.evaluator.last is not None:
            postfix["metric"] = f"{self.evaluator.last.mean:.4g}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        return True

    def on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopOnSignal(Callback):
    """Stop training cleanly on SIGINT / SIGTERM: the signal only sets a flag, the running
    iteration finishes, training stops (the checkpoint callback then saves) and
    :attr:`received` names the signal. A second signal of the same kind acts as usual
    (the previous handler is restored after the first one).

    Use as a context manager around training; it installs its handlers only in the main
    thread (elsewhere it does nothing).
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        import signal

        self.received = signal.Signals(number).name
        signal.signal(number, self._previous.get(number, signal.SIG_DFL))

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + int(getattr(signal, self.received or "SIGINT"))

    def on_step(self) -> bool:
        return self.received is None


ABORT_ENV = "CONTROLMD_ABORT_AFTER"
"""Environment variable: hard-exit (like a kill) after this many iterations; for resume tests."""


class AbortAfter(Callback):
    """Hard-exit the process after ``iterations`` iterations, like a kill (no cleanup).

    Used through the ``CONTROLMD_ABORT_AFTER`` environment variable to test ``--resume``.
    """

    EXIT_CODE = 75

    def __init__(self, iterations: int) -> None:
        check_int("iterations", iterations)
        self.iterations = iterations

    @classmethod
    def from_env(cls) -> AbortAfter | None:
        """The callback :data:`ABORT_ENV` asks for, or ``None`` when it is unset or empty."""
        value = os.environ.get(ABORT_ENV)
        if not value:
            return None
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(
                f"{ABORT_ENV} must be an integer number of iterations, got {value!r}"
            ) from None
        return cls(n)

    def on_step(self) -> bool:
        if self.trainer.iteration >= self.iterations:
            os._exit(self.EXIT_CODE)
        return True

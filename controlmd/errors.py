"""Exceptions raised by controlmd.

Every error names the offending argument (or config key), the value received and what is
allowed, e.g. ``dt must be > 0, got -0.001``.
"""

from __future__ import annotations

__all__ = ["ConfigError", "ControlMDError", "RunInterrupted", "SimulationDivergedError"]


class ControlMDError(ValueError):
    """Base class of controlmd's errors; a ``ValueError`` so generic handlers still catch it."""


class ConfigError(ControlMDError):
    """An experiment configuration is malformed: unknown key, wrong type, missing section."""


class SimulationDivergedError(ControlMDError, FloatingPointError):
    """A trajectory became non-finite (or its energy exploded).

    Attributes:
        step: index of the integration step at which the failure was detected.
        time: simulation time of that step, in the task's time unit.
    """

    def __init__(self, message: str, *, step: int, time: float | None = None) -> None:
        where = f"step {step}" if time is None else f"step {step} (t = {time:.6g})"
        super().__init__(f"simulation diverged at {where}: {message}")
        self.step = step
        self.time = time


class RunInterrupted(Exception):  # noqa: N818  (not an error: a requested stop)
    """A run stopped on SIGINT/SIGTERM after saving its checkpoint.

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        exit_code: the conventional status, 128 + the signal number.
    """

    def __init__(self, message: str, *, signal_name: str, exit_code: int) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = exit_code

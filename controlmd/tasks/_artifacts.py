"""Shared pieces of the classical control tasks (``polymer_fold``, ``assembly``): the
``controls`` list check, one protocol channel as a schedule, and the end-of-run artifacts
(extended XYZ of fresh final replicas and a snapshot figure)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from controlmd._validation import check_choice
from controlmd.dynamics.base import State
from controlmd.errors import ControlMDError
from controlmd.protocols import Protocol
from controlmd.tasks.base import Task

if TYPE_CHECKING:
    from controlmd.logger import Logger

Tensor = torch.Tensor

__all__ = ["ARTIFACT_SEED", "ChannelSchedule", "RunArtifacts", "check_controls", "panel_grid"]

ARTIFACT_SEED = 12_345
"""Batch seed of the replicas that :meth:`RunArtifacts.finish_run` rolls out."""


def check_controls(controls: Sequence[str], channels: Sequence[str]) -> None:
    """``controls`` must be a non-empty list of distinct names from ``channels``."""
    if isinstance(controls, str) or len(controls) == 0:
        raise ControlMDError(
            f"controls must be a non-empty list of channel names from {tuple(channels)}, "
            f"got {controls!r}"
        )
    for c in controls:
        check_choice("controls entry", c, list(channels))
    if len(set(controls)) != len(controls):
        raise ControlMDError(f"controls lists a channel twice: {list(controls)}")


def panel_grid(n_replicas: int, *, max_panels: int = 8) -> tuple[Any, list[Any]]:
    """A matplotlib figure of up to ``max_panels`` tick-less panels (4 per row) for the
    first replicas; returns ``(figure, axes)`` with one axis per shown replica."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = min(max_panels, n_replicas)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.set_axis_off()
    return fig, axes[:n]


class ChannelSchedule(nn.Module):
    """Channel ``channel`` of a protocol as a schedule: ``t -> u(t)[..., channel]``
    (a scalar ``[]``, or ``[B]`` for per-replica protocols), e.g. a bath ``kT(t)``."""

    def __init__(self, protocol: Protocol, channel: int) -> None:
        super().__init__()
        self.protocol = protocol
        self.channel = channel

    def forward(self, t: Tensor) -> Tensor:
        return self.protocol(t)[..., self.channel]


class RunArtifacts(Task[State]):
    """Base of particle tasks that write final-replica artifacts into a run folder.

    The task records the protocol last passed to its ``integrator`` in ``self._protocol``
    and implements :meth:`_write_artifacts`; the trainer calls :meth:`finish_run` after
    the final evaluation, so that protocol is the trained one.
    """

    _protocol: Protocol | None = None

    def finish_run(
        self, run_dir: str | Path, logger: Logger | None = None, step: int = 0
    ) -> dict[str, Any]:
        """Trainer hook after the final evaluation: :meth:`save_artifacts` for the protocol
        last passed to ``integrator`` (16 replicas, seed :data:`ARTIFACT_SEED`), with the
        snapshot figure also sent to ``logger`` under ``outcome/final_snapshots``.
        Returns ``{"artifacts": [file names]}`` (empty when no protocol was simulated)."""
        if self._protocol is None:
            return {"artifacts": []}
        paths, figure = self._artifacts(
            self._protocol, Path(run_dir), n_replicas=16, seed=ARTIFACT_SEED
        )
        if logger is not None:
            logger.record_figure("outcome/final_snapshots", figure, step)
        return {"artifacts": [p.name for p in paths]}

    def save_artifacts(
        self, protocol: Protocol, run_dir: str | Path, *, n_replicas: int = 16, seed: int = 0
    ) -> list[Path]:
        """Roll out ``n_replicas`` fresh replicas under ``protocol`` and write their final
        states: ``final_replicas.xyz`` (extended XYZ with the task's per-replica outcome)
        and ``final_snapshots.png``. Returns the written paths."""
        return self._artifacts(protocol, Path(run_dir), n_replicas=n_replicas, seed=seed)[0]

    def _artifacts(
        self, protocol: Protocol, run_dir: Path, *, n_replicas: int, seed: int
    ) -> tuple[list[Path], Any]:
        """Roll out ``n_replicas`` fresh replicas and write their artifacts; ``(paths, figure)``."""
        run_dir.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            R = self.rollout(protocol, n_replicas, seed, gradient="none").R.detach()
        return self._write_artifacts(R, run_dir)

    @abstractmethod
    def _write_artifacts(self, R: Tensor, run_dir: Path) -> tuple[list[Path], Any]:
        """Write ``final_replicas.xyz`` and ``final_snapshots.png`` for final positions
        ``R`` ``[B, N, d]``; ``(paths, figure)``."""

"""Shared pieces of the classical control tasks (``polymer_fold``, ``assembly``): one
protocol channel as a schedule, and the end-of-run artifacts (extended XYZ of fresh final
replicas and a snapshot figure)."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from controlmd.protocols import Protocol

Tensor = torch.Tensor

__all__ = ["ARTIFACT_SEED", "ChannelSchedule", "RunArtifacts"]

ARTIFACT_SEED = 12_345
"""Batch seed of the replicas that :meth:`RunArtifacts.finish_run` rolls out."""


class ChannelSchedule(nn.Module):
    """Channel ``channel`` of a protocol as a schedule: ``t -> u(t)[..., channel]``
    (a scalar ``[]``, or ``[B]`` for per-replica protocols), e.g. a bath ``kT(t)``."""

    def __init__(self, protocol: Protocol, channel: int) -> None:
        super().__init__()
        self.protocol = protocol
        self.channel = channel

    def forward(self, t: Tensor) -> Tensor:
        return self.protocol(t)[..., self.channel]


class RunArtifacts:
    """Mixin for tasks that write final-replica artifacts into a run folder.

    The task records the protocol last passed to its ``integrator`` in ``self._protocol``
    and implements :meth:`_artifacts`; the trainer calls :meth:`finish_run` after the
    final evaluation, so that protocol is the trained one.
    """

    _protocol: Protocol | None = None

    def finish_run(self, run_dir: str | Path, logger: Any = None, step: int = 0) -> list[Path]:
        """Trainer hook after the final evaluation: :meth:`save_artifacts` for the protocol
        last passed to ``integrator`` (16 replicas, seed :data:`ARTIFACT_SEED`), with the
        snapshot figure also sent to ``logger`` under ``outcome/final_snapshots``.
        Returns the written paths (none when no protocol was simulated)."""
        if self._protocol is None:
            return []
        paths, figure = self._artifacts(self._protocol, Path(run_dir), n_replicas=16, seed=ARTIFACT_SEED)
        if logger is not None:
            logger.record_figure("outcome/final_snapshots", figure, step)
        return paths

    def save_artifacts(self, protocol: Protocol, run_dir: str | Path, *, n_replicas: int = 16,
                       seed: int = 0) -> list[Path]:
        """Roll out ``n_replicas`` fresh replicas under ``protocol`` and write their final
        states: ``final_replicas.xyz`` (extended XYZ with the task's per-replica outcome)
        and ``final_snapshots.png``. Returns the written paths."""
        return self._artifacts(protocol, Path(run_dir), n_replicas=n_replicas, seed=seed)[0]

    @abstractmethod
    def _artifacts(self, protocol: Protocol, run_dir: Path, *, n_replicas: int,
                   seed: int) -> tuple[list[Path], Any]:
        """Write the artifacts of ``n_replicas`` fresh replicas; ``(paths, figure)``."""

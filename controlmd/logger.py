"""One ``record(key, value)`` funnel, many sinks (TensorBoard, JSON lines).

Keys are slash-namespaced: ``train/loss``, ``train/grad_norm``, ``train/grad_var``,
``train/lr``, ``outcome/metric``, ``budget/md_steps``, ``budget/grad_steps``,
``time/wall_s``, ``time/cpu_s`` (keys with units say so). :meth:`Logger.record` collects scalars and
:meth:`Logger.dump` hands them to every sink at a step; histograms, figures and hparams go
straight to the sinks that can show them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

Tensor = torch.Tensor

__all__ = ["JSONLinesSink", "Logger", "Sink", "TensorBoardSink"]


class Sink:
    """Where recorded values go; sinks ignore what they cannot show."""

    def write(self, values: dict[str, float], step: int) -> None:
        pass

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        pass

    def figure(self, key: str, figure: Any, step: int) -> None:
        pass

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink(Sink):
    """TensorBoard event files in ``log_dir``.

    Args:
        log_dir: folder of the event files (a run's ``tb/``).
        purge_step: on resume, the first step not covered by the checkpoint: events of the
            interrupted run at steps >= it are discarded, so the curves have no duplicates.
    """

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if purge_step is not None:
            _wait_past_existing_event_files(Path(log_dir))
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)

    def write(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        values = values.detach().flatten().to(torch.float64).cpu()
        if values.numel() and bool(torch.isfinite(values).all()):
            self.writer.add_histogram(key, values.numpy(), step)

    def figure(self, key: str, figure: Any, step: int) -> None:
        self.writer.add_figure(key, figure, step, close=False)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        exp, ssi, sei = hparams_summary(hparams, metrics)
        file_writer = self.writer.file_writer
        assert file_writer is not None  # SummaryWriter opens it in __init__
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wait_past_existing_event_files(log_dir: Path) -> None:
    """Sleep until the clock's whole second exceeds every event file's in ``log_dir``.

    TensorBoard reads a folder's event files in name order, and the name is
    ``events.out.tfevents.<whole seconds>.<host>.<pid>...``: a resumed writer created in
    the same second as the interrupted one could sort before it (by pid), and the reader
    would then replay the old steps after the purge.
    """
    import time

    stamps = []
    for f in log_dir.glob("events.out.tfevents.*"):
        part = f.name.split(".")[3]
        if part.isdigit():
            stamps.append(int(part))
    if stamps:
        delay = max(stamps) + 1 - time.time()
        if delay > 0:
            time.sleep(delay)


class JSONLinesSink(Sink):
    """One JSON object per dump (``{"step": ..., key: value, ...}``) appended to ``path``.

    On resume (``purge_step``) lines of the interrupted run at steps >= it are dropped.
    """

    def __init__(self, path: str | Path, *, purge_step: int | None = None) -> None:
        self.path = Path(path)
        if purge_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip()
                and _complete_step(line) is not None
                and _complete_step(line) < purge_step  # type: ignore[operator]
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, values: dict[str, float], step: int) -> None:
        clean = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _complete_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut by a kill


class Logger:
    """SB3-style logger: ``record`` scalars, ``dump(step)`` them to every sink.

    Args:
        sinks: where values go (none: values are only kept in :attr:`latest`).
    """

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks = list(sinks or [])
        self._pending: dict[str, float] = {}
        self.latest: dict[str, float] = {}

    def record(self, key: str, value: float | Tensor) -> None:
        """Queue a scalar under a namespaced key (``"train/loss"``)."""
        self._pending[key] = float(value.detach()) if isinstance(value, Tensor) else float(value)

    def dump(self, step: int) -> None:
        """Write the queued scalars at ``step``."""
        if not self._pending:
            return
        for sink in self.sinks:
            sink.write(self._pending, step)
        self.latest.update(self._pending)
        self._pending = {}

    def record_histogram(self, key: str, values: Tensor, step: int) -> None:
        for sink in self.sinks:
            sink.histogram(key, values, step)

    def record_figure(self, key: str, figure: Any, step: int) -> None:
        for sink in self.sinks:
            sink.figure(key, figure, step)

    def record_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Hyperparameters (scalars/strings) with the final metrics, for TensorBoard's HParams tab."""
        clean = {
            k: (v if isinstance(v, bool | int | float | str) else str(v))
            for k, v in hparams.items()
        }
        for sink in self.sinks:
            sink.hparams(clean, metrics)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

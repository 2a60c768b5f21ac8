"""Run folders: where one training run lives, who may write it, and what state it is in.

A run folder holds ``config.toml`` (first the requested config, then the resolved one),
``checkpoint.pt`` (and its back-up ``checkpoint.prev.pt``), ``metrics.json`` (written last:
the run is finished) and the logs and figures. :class:`RunFolder` decides whether a folder
may be used:

* a new run (``--out DIR`` or the default ``runs/<name>/<time>_seed<k>/``) needs a folder
  that does not exist or is empty; a folder holding a run is refused with a hint to
  ``--resume``; any other non-empty folder is refused;
* a resumed run needs a folder with a ``config.toml``;
* one process at a time: ``run.lock`` (process id, host, start time) is created
  exclusively and removed on exit; a lock whose process is gone (same host) is stale and
  taken over with a warning.

Nothing here imports torch: the CLI creates the folder, writes the requested config and
takes the lock within a fraction of a second of starting, so a run killed at any moment
can be resumed (``--resume`` of a folder that never reached a checkpoint starts it again
in place).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import time
import warnings
from datetime import datetime
from pathlib import Path

from controlmd.errors import ConfigError, ControlMDError
from controlmd.files import atomic_write_text

__all__ = ["LOCK_FILE", "RunFolder", "default_run_dir"]

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_BACKUP = "checkpoint.prev.pt"  # controlmd.checkpoint.backup_path of the checkpoint
METRICS_FILE = "metrics.json"


def default_run_dir(runs_root: str | Path, name: str, seed: int) -> Path:
    """``runs_root/<name>/<YYYYmmdd-HHMMSS>_seed<k>/`` (``_2``, ``_3``, ... if taken)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(runs_root) / name / f"{stamp}_seed{seed}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    return path


class RunFolder:
    """A run folder this process holds the lock of (see the module docstring).

    Build one with :meth:`new` or :meth:`existing`; :meth:`release` (also run at exit)
    gives the lock back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._locked = False

    # ------------------------------------------------------------------ opening

    @classmethod
    def new(cls, path: str | Path, *, option: str = "--out") -> RunFolder:
        """Create (or take, if empty) the folder of a new run and lock it.

        :param option: how the user named the folder, for messages.
        :raises ConfigError: the folder holds a run (use ``--resume``), holds anything
            else, or is a file.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{option} {path} is a file, not a folder")
        if path.is_dir() and any(path.iterdir()):
            if (path / CONFIG_FILE).exists():
                raise ConfigError(
                    f"{option} {path} already holds a run; use --resume {path} to continue it"
                )
            raise ConfigError(f"{option} {path} is not empty and is not a controlmd run folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlMDError(f"cannot create {option} {path}: {exc.strerror or exc}") from None
        folder = cls(path)
        folder._lock()
        return folder

    @classmethod
    def existing(cls, path: str | Path) -> RunFolder:
        """Lock the folder of a run to resume.

        :raises ConfigError: not a folder, or no ``config.toml`` in it.
        """
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"--resume {path}: no such run folder")
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume {path} is not a run folder: it has no {CONFIG_FILE}")
        folder = cls(path)
        folder._lock()
        return folder

    # ------------------------------------------------------------------ state

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def finished(self) -> bool:
        """Whether the run wrote its ``metrics.json`` (the last file of a run)."""
        return self.metrics.is_file()

    @property
    def has_checkpoint(self) -> bool:
        """Whether a checkpoint (or its back-up) exists: the run can continue from it."""
        return self.checkpoint.is_file() or (self.path / CHECKPOINT_BACKUP).is_file()

    def write_config(self, text: str) -> None:
        atomic_write_text(self.config, text)

    def reset(self) -> None:
        """Remove everything but the config and the lock: the run starts again in place."""
        for entry in self.path.iterdir():
            if entry.name in (CONFIG_FILE, LOCK_FILE):
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def remove(self) -> None:
        """Delete the folder (a new run whose config turned out invalid leaves nothing)."""
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)

    # ------------------------------------------------------------------ the lock

    def _lock(self) -> None:
        lock = self.path / LOCK_FILE
        record = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale(lock):
                    raise
                continue
            except OSError as exc:
                raise ControlMDError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w") as f:
                f.write(record + "\n")
            self._locked = True
            atexit.register(self.release)
            return
        raise ConfigError(f"{self.path} is locked by another process ({lock})")

    def _stale(self, lock: Path) -> bool:
        """Whether an existing lock belongs to a process that is gone (then it is removed);
        raises when a live process holds it."""
        try:
            owner = json.loads(lock.read_text(encoding="utf-8"))
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            owner, pid, host = {}, -1, ""
        if host and host != socket.gethostname():
            raise ConfigError(
                f"{self.path} is in use by process {pid} on host {host} (since "
                f"{owner.get('started', '?')}); if that run is gone, delete {lock}"
            )
        if pid > 0 and _alive(pid):
            raise ConfigError(
                f"{self.path} is in use by process {pid} (since {owner.get('started', '?')}); "
                f"wait for it to finish, or stop it first"
            )
        warnings.warn(
            f"{lock} was left by a process that is gone (pid {pid}); taking the run over",
            RuntimeWarning,
            stacklevel=3,
        )
        lock.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        """Give the lock back (idempotent)."""
        if self._locked:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self._locked = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

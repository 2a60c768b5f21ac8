"""``controlmd report``: the task-specific figures and numbers of a finished run.

::

    controlmd report RUN_DIR

Tasks with a report: ``isomerization`` (yields, fields and spectra of the starting and
trained pulses).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "task-specific figures and numbers of a finished run (isomerization)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder written by `controlmd run`")


def run(args: argparse.Namespace) -> int:
    from controlmd.config import read_run_config
    from controlmd.errors import ConfigError

    task = read_run_config(args.run_dir)["task"]["name"]
    if task != "isomerization":
        raise ConfigError(
            f"{args.run_dir}: task {task!r} has no report (tasks with one: isomerization)"
        )
    from controlmd.reports.isomerization import write_report

    report = write_report(args.run_dir)
    print(
        f"yield: {report['initial_yield']:.4f} (starting field) -> "
        f"{report['trained_yield']:.4f} (trained)"
    )
    print(
        f"fluence: {report['initial_fluence_eV2_fs']:.4g} -> "
        f"{report['trained_fluence_eV2_fs']:.4g} eV^2 fs"
    )
    print(f"figures and isomerization_report.json written to {args.run_dir}")
    return 0

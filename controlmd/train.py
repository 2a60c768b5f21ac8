"""Gradient training, kept as one import path: the trainer lives in :mod:`controlmd.trainer`,
the estimators in :mod:`controlmd.estimators`, evaluation in :mod:`controlmd.evaluation`,
whole runs in :mod:`controlmd.experiment` and the seed offsets in :mod:`controlmd.rng`.
"""

from __future__ import annotations

from controlmd.estimators import MAX_FORWARD_PARAMETERS
from controlmd.evaluation import Evaluation, evaluate
from controlmd.experiment import RunResult, run_experiment
from controlmd.rng import EVAL_SEED_OFFSET, FINAL_SEED_OFFSET, RESCORE_SEED_OFFSET
from controlmd.trainer import Trainer, task_parameters

__all__ = [
    "EVAL_SEED_OFFSET",
    "FINAL_SEED_OFFSET",
    "MAX_FORWARD_PARAMETERS",
    "RESCORE_SEED_OFFSET",
    "Evaluation",
    "RunResult",
    "Trainer",
    "evaluate",
    "run_experiment",
    "task_parameters",
]

"""One training run from a resolved experiment config: build, train, score, write the folder.

:func:`run_experiment` is what ``controlmd run`` calls: it builds the task, protocol and
trainer from the config, trains with evaluation / checkpoint / progress callbacks, scores
the initial and trained protocols on the same fresh replicas (batch seed
``seed + FINAL_SEED_OFFSET``) and writes the run folder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from controlmd.callbacks import (
    AbortAfter,
    CheckpointCallback,
    EvalCallback,
    HistogramCallback,
    ProgressBar,
)
from controlmd.checkpoint import atomic_write_json, json_safe, load_checkpoint, set_rng_state
from controlmd.config import build_protocol, build_task, read_run_config, write_config
from controlmd.distributed import DistributedContext
from controlmd.errors import ConfigError
from controlmd.logger import JSONLinesSink, Logger, TensorBoardSink
from controlmd.protocols import Protocol
from controlmd.rng import FINAL_SEED_OFFSET
from controlmd.tasks.base import Task
from controlmd.trainer import Trainer

__all__ = ["RunResult", "run_experiment"]


@dataclass
class RunResult:
    """Outcome of :func:`run_experiment`: the run folder and the contents of metrics.json."""

    run_dir: Path
    metrics: dict[str, Any]


def run_experiment(
    cfg: dict[str, dict[str, Any]],
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    runs_root: str | Path = "runs",
    progress: bool | None = None,
    distributed: DistributedContext | None = None,
) -> RunResult:
    """Train the protocol of a resolved config and write a run directory.

    Everything is validated and built before the first file is written. The folder is
    ``resume`` (continuing its checkpoint), else ``out``, else
    ``runs_root/<experiment>/<YYYYmmdd-HHMMSS>_seed<k>/``. It receives ``config.toml``,
    ``metrics.json``, ``protocol.pt`` (+ ``protocol.csv``, ``protocol_initial.pt``),
    ``protocol.png``, ``progress.jsonl``, ``tb/`` (TensorBoard) and ``checkpoint.pt``.

    With ``distributed`` (``torchrun``), every rank trains its share of the replicas and
    returns the same result; only rank 0 writes the folder (whose name it chooses and sends
    to the others). A resumed run reads its checkpoint on every rank (shared file system).

    :raises ConfigError: bad config, or a resume folder of another experiment / setup.
    """
    checkpoint = None
    if resume is not None:
        resume = Path(resume)
        saved = read_run_config(resume)
        _check_resumable(saved, cfg, resume)
        cfg = {
            **saved,
            "logging": cfg["logging"],
            "train": {**saved["train"], "iterations": cfg["train"]["iterations"]},
        }
        checkpoint = load_checkpoint(resume / "checkpoint.pt")
    seed = cfg["experiment"]["seed"]
    torch.manual_seed(seed)
    task = build_task(cfg)
    protocol = build_protocol(cfg, task)
    initial = copy.deepcopy(protocol)
    dist_ctx = distributed if distributed is not None else DistributedContext()
    trainer = Trainer.from_config(cfg, task, protocol, distributed=dist_ctx)
    abort_after = AbortAfter.from_env()
    if checkpoint is not None:
        try:
            trainer.load_state_dict(checkpoint["trainer"])
            initial.load_state_dict(checkpoint["initial_protocol"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"checkpoint in {resume} does not match its config: {exc}") from None
        set_rng_state(checkpoint["rng"])
    run_dir = resume if resume is not None else _new_run_dir(cfg, out, runs_root)
    run_dir = Path(dist_ctx.broadcast_object(str(run_dir)))  # scale-out: rank 0's choice
    writer = dist_ctx.is_main  # scale-out: only rank 0 writes files
    log_cfg, eval_cfg = cfg["logging"], cfg["eval"]

    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None and writer:
        write_config(cfg, run_dir / "config.toml")
        initial.save(run_dir / "protocol_initial.pt")
    # the checkpoint of iteration i was written after every event of step i was flushed
    purge = trainer.iteration + 1 if checkpoint is not None else None
    sinks: list[Any] = (
        [JSONLinesSink(run_dir / "progress.jsonl", purge_step=purge)] if writer else []
    )
    if log_cfg["tensorboard"] and writer:
        sinks.append(TensorBoardSink(run_dir / "tb", purge_step=purge))
    logger = Logger(sinks)
    trainer.logger = logger
    final_seed = seed + FINAL_SEED_OFFSET
    chunk = eval_cfg["chunk"]

    if checkpoint is None:
        before = trainer.evaluate(eval_cfg["final_replicas"], final_seed, chunk=chunk)
        start = {
            "metric_initial": before.mean,
            "metric_initial_se": before.se,
            "metric_exact_initial": trainer.exact_metric(),
        }
        if log_cfg["tensorboard"] and writer and protocol.dim > 0:
            logger.record_figure("protocol/u", _protocol_figure(task, {"initial": initial}), 0)
    else:
        start = checkpoint["start"]

    def payload() -> dict[str, Any]:
        return {"start": start, "initial_protocol": initial.state_dict(), "config": cfg}

    evaluator = EvalCallback(every=eval_cfg["every"], n_replicas=eval_cfg["replicas"], chunk=chunk)
    callbacks: list[Any] = [evaluator]
    if log_cfg["histogram_every"] and log_cfg["tensorboard"] and writer:
        callbacks.append(HistogramCallback(log_cfg["histogram_every"]))
    if writer:
        callbacks.append(
            CheckpointCallback(
                run_dir / "checkpoint.pt", every=log_cfg["checkpoint_every"], payload=payload
            )
        )
    show = log_cfg["progress"] if progress is None else progress
    if show and writer:
        callbacks.append(ProgressBar(cfg["train"]["iterations"], evaluator))
    if abort_after is not None:
        callbacks.append(abort_after)
    trainer.learn(cfg["train"]["iterations"], callbacks, progress=False)

    after = trainer.evaluate(eval_cfg["final_replicas"], final_seed, chunk=chunk)
    if writer:  # task-specific files and figures, before extras()
        task.finish_run(run_dir, logger, trainer.iteration)
    metrics: dict[str, Any] = {
        "experiment": cfg["experiment"]["name"],
        "task": task.name,
        "method": "gradient",
        "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "units": task.units,
        "metric_initial": start["metric_initial"],
        "metric_final": after.mean,
        "metric_initial_se": start["metric_initial_se"],
        "metric_final_se": after.se,
        "eval_replicas": after.n,
        "md_steps": trainer.md_steps,
        "grad_steps": trainer.grad_steps,
        "wall_s": trainer.wall_s,
        "cpu_s": trainer.cpu_s,
        "seed": seed,
        "iterations": trainer.iteration,
        "protocol_kind": protocol.kind,
        "protocol_parameters": trainer.n_parameters,
        "estimator": trainer.estimator,
        "gradient": trainer.gradient,
        "optimizer": trainer.optimizer_name,
        "replicas": trainer.replicas,
        "world_size": dist_ctx.world_size,
    }
    exact_final = trainer.exact_metric()
    if exact_final is not None:
        metrics["metric_exact_initial"] = start["metric_exact_initial"]
        metrics["metric_exact_final"] = exact_final
    metrics = json_safe({**task.extras(), **metrics})  # task extras never shadow the core keys
    if not writer:  # scale-out: the other ranks are done
        logger.close()
        return RunResult(run_dir, metrics)

    protocol.save(run_dir / "protocol.pt")
    protocol.write_table(run_dir / "protocol.csv")
    if (log_cfg["plots"] or log_cfg["tensorboard"]) and protocol.dim > 0:
        figure = _protocol_figure(task, {"initial": initial, "trained": protocol})
        if log_cfg["plots"]:
            from controlmd.plotting import save_figure

            save_figure(figure, run_dir / "protocol.png")
        if log_cfg["tensorboard"]:
            logger.record_figure("protocol/u", figure, trainer.iteration)
    final_scalars = {
        "outcome/metric_final": after.mean,
        "outcome/metric_initial": start["metric_initial"],
    }
    logger.record_hparams(_hparams(cfg), final_scalars)
    logger.record("outcome/metric", after.mean)
    logger.record("budget/md_steps", trainer.md_steps)
    logger.record("time/wall_s", trainer.wall_s)
    logger.dump(trainer.iteration)
    logger.close()
    # checkpoint.pt stays the one written when training ended (before the final scoring),
    # so resuming a finished run re-scores it to the same numbers
    atomic_write_json(run_dir / "metrics.json", metrics)
    return RunResult(run_dir, metrics)


def _check_resumable(
    saved: dict[str, dict[str, Any]], cfg: dict[str, dict[str, Any]], run_dir: Path
) -> None:
    if saved["experiment"]["name"] != cfg["experiment"]["name"]:
        raise ConfigError(
            f"--resume {run_dir}: that run belongs to experiment {saved['experiment']['name']!r}, "
            f"not {cfg['experiment']['name']!r}"
        )
    for section in ("experiment", "task", "protocol", "train", "eval"):
        for key in sorted(set(saved[section]) | set(cfg[section])):
            if section == "train" and key == "iterations":
                continue
            a, b = saved[section].get(key), cfg[section].get(key)
            if a != b:
                raise ConfigError(
                    f"--resume {run_dir}: [{section}] {key} = {b!r} differs from the run's {a!r}; "
                    "a resumed run keeps its config (only train.iterations and [logging] may change)"
                )


def _new_run_dir(
    cfg: dict[str, dict[str, Any]], out: str | Path | None, runs_root: str | Path
) -> Path:
    if out is not None:
        path = Path(out)
        if (path / "config.toml").exists() or (path / "checkpoint.pt").exists():
            raise ConfigError(
                f"--out {path} already holds a run; use --resume {path} to continue it"
            )
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(runs_root) / cfg["experiment"]["name"] / f"{stamp}_seed{cfg['experiment']['seed']}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    return path


def _protocol_figure(task: Task[Any], protocols: dict[str, Protocol]) -> Any:
    from controlmd.plotting import plot_protocols

    tables = {label: p.sample(400) for label, p in protocols.items()}
    reference = task.reference_protocol()
    if reference is not None:
        tables["reference"] = reference
    return plot_protocols(
        tables,
        channel_names=task.controls.names,
        units=task.controls.units,
        title=f"{task.name}: u(t)",
    )


def _hparams(cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in ("task", "protocol", "train"):
        for key, value in cfg[section].items():
            out[f"{section}.{key}"] = value
    out["experiment.seed"] = cfg["experiment"]["seed"]
    return out

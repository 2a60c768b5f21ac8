"""One training run from a resolved experiment config: build, train, score, write the folder.

:func:`run_experiment` is what ``controlmd run`` calls: it builds the task, protocol and
trainer from the config, trains with evaluation / checkpoint / progress callbacks, scores
the initial and trained protocols on the same fresh replicas (batch seed
``seed + FINAL_SEED_OFFSET``) and writes the run folder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from controlmd.callbacks import (
    AbortAfter,
    CheckpointCallback,
    EvalCallback,
    HistogramCallback,
    ProgressBar,
    StopOnSignal,
)
from controlmd.checkpoint import atomic_write_json, json_safe, load_checkpoint, set_rng_state
from controlmd.config import build_protocol, build_task, read_run_config, write_config
from controlmd.distributed import DistributedContext
from controlmd.dynamics.fused import use_fused_steps
from controlmd.errors import ConfigError, RunInterrupted
from controlmd.files import read_json
from controlmd.logger import JSONLinesSink, Logger, TensorBoardSink
from controlmd.protocols import Protocol
from controlmd.rng import FINAL_SEED_OFFSET, use_rng
from controlmd.runfolder import RunFolder, default_run_dir
from controlmd.tasks.base import Task
from controlmd.trainer import Trainer

__all__ = ["RunResult", "run_experiment"]


@dataclass
class RunResult:
    """Outcome of :func:`run_experiment`: the run folder and the contents of metrics.json."""

    run_dir: Path
    metrics: dict[str, Any]
    already_finished: bool = False
    """``True`` when a resumed run had finished already and nothing was done."""


def run_experiment(
    cfg: dict[str, dict[str, Any]],
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    runs_root: str | Path = "runs",
    progress: bool | None = None,
    distributed: DistributedContext | None = None,
    folder: RunFolder | None = None,
) -> RunResult:
    """Train the protocol of a resolved config and write a run directory.

    Everything is validated and built before the first file is written. The folder is
    ``resume`` (continuing its checkpoint), else ``out``, else
    ``runs_root/<experiment>/<YYYYmmdd-HHMMSS>_seed<k>/``; it is locked while the run
    goes on (:class:`~controlmd.runfolder.RunFolder`). It receives ``config.toml``,
    ``metrics.json``, ``protocol.pt`` (+ ``protocol.csv``, ``protocol_initial.pt``),
    ``protocol.png``, ``progress.jsonl``, ``tb/`` (TensorBoard) and ``checkpoint.pt``
    (written before the first iteration, every ``checkpoint_every`` iterations and when
    training ends; the previous one is kept as ``checkpoint.prev.pt``).

    Resuming: the config may change only in ``train.iterations`` (not below the iterations
    done); a finished run (``metrics.json``) asked for no more iterations is returned as it
    is; a folder whose run never reached a checkpoint starts again in place. SIGINT/SIGTERM
    stop training after the running iteration, save the checkpoint and raise
    :class:`~controlmd.errors.RunInterrupted`.

    With ``distributed`` (``torchrun``), every rank trains its share of the replicas and
    returns the same result; only rank 0 writes the folder (whose name it chooses and sends
    to the others). A resumed run reads its checkpoint on every rank (shared file system).

    :param folder: a folder the caller already created and locked (the CLI does, before
        loading torch); it is used as ``out`` (or ``resume``) and released at the end.
    :raises ConfigError: bad config, a folder that cannot be used, or a resume folder of
        another experiment / setup.
    """
    dist_ctx = distributed if distributed is not None else DistributedContext()
    dist_ctx.shard(cfg["train"]["replicas"])  # refuse a bad split before any file or collective
    writer = dist_ctx.is_main  # scale-out: only rank 0 writes files
    if folder is not None:
        (resume, out) = (folder.path, None) if resume is not None else (None, folder.path)
    checkpoint = None
    if resume is not None:
        resume = Path(resume)
        saved = read_run_config(resume)
        _check_resumable(saved, cfg, resume)
        cfg = {**saved, "train": {**saved["train"], "iterations": cfg["train"]["iterations"]}}
    if writer and folder is None:
        if resume is not None:
            folder = RunFolder.existing(resume)
        else:
            target = (
                out
                if out is not None
                else default_run_dir(
                    runs_root, cfg["experiment"]["name"], cfg["experiment"]["seed"]
                )
            )
            folder = RunFolder.new(target)
    try:
        if resume is not None and folder is not None and not folder.has_checkpoint:
            folder.reset()  # killed before its first checkpoint: start again in place
            resume = None
        elif resume is not None:
            checkpoint = load_checkpoint(resume / "checkpoint.pt")
            done = int(checkpoint["trainer"]["iteration"])
            if cfg["train"]["iterations"] < done:
                raise ConfigError(
                    f"--resume {resume}: train.iterations = {cfg['train']['iterations']} is "
                    f"fewer than the {done} iterations already done"
                )
            if (resume / "metrics.json").is_file():
                if cfg["train"]["iterations"] == done:  # finished: nothing to do
                    metrics = read_json(resume / "metrics.json", "metrics")
                    return RunResult(resume, metrics, already_finished=True)
                (resume / "metrics.json").unlink()  # more iterations: the run goes on
        run_dir = folder.path if folder is not None else Path(out or ".")
        run_dir = Path(dist_ctx.broadcast_object(str(run_dir)))  # scale-out: rank 0's choice
        with (
            StopOnSignal() as stop,
            use_rng(cfg["experiment"]["rng"]),
            use_fused_steps(cfg["experiment"]["fused_steps"]),
        ):
            return _train(cfg, run_dir, checkpoint, stop, progress=progress, dist_ctx=dist_ctx)
    finally:
        if folder is not None:
            folder.release()


def _train(
    cfg: dict[str, dict[str, Any]],
    run_dir: Path,
    checkpoint: dict[str, Any] | None,
    stop: StopOnSignal,
    *,
    progress: bool | None,
    dist_ctx: DistributedContext,
) -> RunResult:
    """:func:`run_experiment` once its folder is settled: build, train, score, write."""
    resume = run_dir if checkpoint is not None else None
    seed = cfg["experiment"]["seed"]
    torch.manual_seed(seed)
    task = build_task(cfg)
    protocol = build_protocol(cfg, task)
    initial = copy.deepcopy(protocol)
    trainer = Trainer.from_config(cfg, task, protocol, distributed=dist_ctx)
    abort_after = AbortAfter.from_env()
    if checkpoint is not None:
        try:
            trainer.load_state_dict(checkpoint["trainer"])
            initial.load_state_dict(checkpoint["initial_protocol"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"checkpoint in {resume} does not match its config: {exc}") from None
        set_rng_state(checkpoint["rng"])
    writer = dist_ctx.is_main  # scale-out: only rank 0 writes files
    log_cfg, eval_cfg = cfg["logging"], cfg["eval"]

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

    start: dict[str, Any]  # metric_initial, metric_initial_se (float), metric_exact_initial
    if checkpoint is None:
        before = trainer.evaluate(eval_cfg["final_replicas"], final_seed, chunk=chunk)
        start = {
            "metric_initial": before.mean,
            "metric_initial_se": before.se,
            "metric_exact_initial": trainer.exact_metric(),
            "field_cost_initial": before.field_cost,
        }
        if log_cfg["tensorboard"] and writer and protocol.dim > 0:
            logger.record_figure("protocol/u", _protocol_figure(task, {"initial": initial}), 0)
    else:
        start = checkpoint["start"]

    def payload() -> dict[str, Any]:
        return {"start": start, "initial_protocol": initial.state_dict(), "config": cfg}

    evaluator = EvalCallback(every=eval_cfg["every"], n_replicas=eval_cfg["replicas"], chunk=chunk)
    callbacks: list[Any] = [evaluator, stop]
    if log_cfg["histogram_every"] and log_cfg["tensorboard"] and writer:
        callbacks.append(HistogramCallback(log_cfg["histogram_every"]))
    if writer:
        checkpointer = CheckpointCallback(
            run_dir / "checkpoint.pt", every=log_cfg["checkpoint_every"], payload=payload
        )
        callbacks.append(checkpointer)
        if checkpoint is None:  # before the first iteration: a kill from now on resumes
            checkpointer.init_callback(trainer)
            checkpointer.save()
    show = log_cfg["progress"] if progress is None else progress
    if show and writer:
        callbacks.append(ProgressBar(cfg["train"]["iterations"], evaluator))
    if abort_after is not None:
        callbacks.append(abort_after)
    if stop.received is None:
        trainer.learn(cfg["train"]["iterations"], callbacks, progress=False)
    if stop.received is not None:
        logger.close()
        raise RunInterrupted(
            f"stopped by {stop.received} after iteration {trainer.iteration}; the checkpoint "
            f"is saved: continue with controlmd run --resume {run_dir}",
            signal_name=stop.received,
            exit_code=stop.exit_code,
        )

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
    if after.field_cost is not None:  # tasks with a spatial control field
        metrics["field_cost_initial"] = start.get("field_cost_initial")
        metrics["field_cost_final"] = after.field_cost
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
    for section in ("experiment", "task", "protocol", "train", "eval", "logging"):
        for key in sorted(set(saved[section]) | set(cfg[section])):
            if section == "train" and key == "iterations":
                continue
            a, b = saved[section].get(key), cfg[section].get(key)
            if a != b:
                raise ConfigError(
                    f"--resume {run_dir}: [{section}] {key} = {b!r} differs from the run's {a!r}; "
                    "a resumed run keeps its config (only train.iterations may grow)"
                )


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

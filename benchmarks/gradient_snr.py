"""Signal-to-noise ratio of each gradient estimator per protocol piece, at a fixed budget.

Usage::

    python benchmarks/gradient_snr.py experiments/polymer_fold.toml --budget 1000000 \
        --pieces 8 --groups 8 --json experiments/results/gradient_snr_polymer_fold.json \
        [--estimators pathwise last_window multiwindow score mixed] [--set task.n_steps=400]

The experiment's task is built as configured; the protocol is a ``--pieces``-piece
piecewise-constant protocol of channel 0 held at the experiment's initial value (``[protocol]
init`` when it is one number, else the task's no-control value), without bounds, so the
gradient is ``dL/du_k`` in the channel's unit. Each estimator gets ``--budget`` replica-steps
per gradient estimate: ``replicas = budget / n_steps`` replicas in ``--groups`` independent
groups (seeds ``--seed + g``); per piece ``k``:

* ``mean``: the estimate (mean over groups), ``se``: its standard error (spread over groups),
  ``snr = |mean| / se`` (0 when every group's gradient is exactly 0);
* ``sign_agrees``: whether the estimate points the way the exact metric improves, judged by
  a central finite difference of the exact metric on common random numbers
  (``--fd-replicas`` replicas, default ``replicas``; seed ``--seed + 1000``, step
  ``--fd-step`` times the channel's range);
* ``counted``: whether that finite difference is nonzero at 3 standard errors (pieces
  inside a release window, where the control is switched off, are not counted).

Estimators (``--estimators``):

* ``pathwise``: the task's smooth surrogate differentiated through the whole horizon (in
  blocks of ``--chunk`` replicas: the same gradient, bounded memory);
* ``last_window``: the same, truncated to the last ``--window`` steps (``[train] window``
  of the experiment when it truncates, else one piece): today's practice;
* ``multiwindow``: ``--pieces`` windows (one per piece), each window's surrogate at its end;
* ``score``: the score-function estimator on the exact metric itself (loss ``1 - metric``
  when higher is better), leave-one-out baseline, blocks of ``--chunk`` replicas;
* ``mixed``: the score function for the steps before the last piece, the pathwise derivative
  of the smooth surrogate through the last piece (``--pieces`` windows), blocks of
  ``--chunk`` replicas: unbiased for the surrogate's expected value.

``--add-to RESULT.json`` adds estimators to an earlier results file of the same settings,
reusing its finite difference (the expensive part).

``python benchmarks/gradient_snr.py ESTIMATES.json --fd-from FD.json --json OUT.json`` judges
the estimators of one results file (e.g. a run with ``--fd-replicas 0``) against the finite
difference of another of the same settings, so the two can run side by side.

``python benchmarks/gradient_snr.py RESULT.json`` prints a results file as a markdown table
(``snr``, then ``+``/``-`` for the sign's agreement, ``*`` for a counted piece).

Noise comes from the experiment's ``[experiment] rng`` (``--set experiment.rng=philox``: one
batched draw for all replicas instead of a loop over per-replica generators).

The JSON file holds, per estimator, ``pieces`` (one entry per piece: ``piece``, ``mean``,
``se``, ``snr``, ``sign_agrees``, ``counted``), ``all_counted_ok`` (SNR >= 1 and the right
sign on every counted piece) and ``wall_s``; ``finite_difference`` per piece; the command
and the load average. It is rewritten after every estimator, so a killed run keeps what it
finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from controlmd.config import build_task, load_config
from controlmd.distributed import DistributedContext
from controlmd.dynamics.base import State
from controlmd.estimators import RolloutBatch, make_estimator
from controlmd.protocols import PiecewiseConstant, Protocol
from controlmd.rng import use_rng
from controlmd.tasks.base import Task

ESTIMATOR_CHOICES = ("pathwise", "last_window", "multiwindow", "score", "mixed")


class ExactMetricLoss(Task[State]):
    """A task whose loss is its exact metric (``mean(1 - metric)`` when higher is better):
    what the score-function estimator differentiates without a surrogate."""

    def __init__(self, task: Task[Any]) -> None:
        self.inner = task
        self.name = task.name  # type: ignore[misc]
        self.metric_name = task.metric_name  # type: ignore[misc]
        self.higher_is_better = task.higher_is_better  # type: ignore[misc]
        self.units = task.units  # type: ignore[misc]
        self.capabilities = task.capabilities  # type: ignore[misc]
        self.controls, self.dt, self.n_steps = task.controls, task.dt, task.n_steps

    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> State:
        return self.inner.initial_state(n_replicas, seed, first_replica=first_replica)

    def integrator(self, protocol: Protocol) -> Any:
        return self.inner.integrator(protocol)

    def metric(self, state: State) -> torch.Tensor:
        return self.inner.metric(state)

    def loss(self, state: State) -> torch.Tensor:
        m = self.inner.metric(state).to(torch.float64)
        return (1.0 - m).mean() if self.higher_is_better else m.mean()


def piece_protocol(task: Task[Any], pieces: int, value: float) -> PiecewiseConstant:
    init = torch.full((pieces, task.controls.dim), 0.0, dtype=torch.float64)
    default = task.default_control()
    if default is not None:
        init[:] = default
    init[:, 0] = value
    return PiecewiseConstant(
        dim=task.controls.dim, t_final=task.horizon, n_pieces=pieces, init=init
    )


def group_gradients(
    task: Task[Any],
    protocol: PiecewiseConstant,
    estimator: str,
    options: dict[str, Any],
    replicas: int,
    groups: int,
    seed: int,
    chunk: int,
    windows: int,
) -> torch.Tensor:
    """``[groups, pieces]``: d loss / d u_k (channel 0) of each independent group."""
    est = make_estimator(
        estimator, chunk=chunk, windows=windows if estimator in ("multiwindow", "mixed") else 1
    )
    params = [protocol.values]
    out = []
    for g in range(groups):
        batch = RolloutBatch(
            task=task,
            protocol=protocol,
            params=params,  # type: ignore[arg-type]
            replicas=replicas,
            shard=DistributedContext().shard(replicas),
            simulate_options=options,
            grad_groups=0,
        )
        out.append(est.estimate(batch, seed + g, with_variance=False).grads[0][:, 0].detach())
    return torch.stack(out)


def finite_difference(
    task: Task[Any], protocol: PiecewiseConstant, replicas: int, seed: int, h: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Central difference of the exact metric per piece on common random numbers: value and
    standard error ``[pieces]`` each (replicas evaluated in blocks of ``chunk``)."""
    K = protocol.values.shape[0]
    value, se = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    for k in range(K):
        diffs = []
        for first in range(0, replicas, chunk):
            n = min(chunk, replicas - first)
            metrics = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    protocol.values[k, 0] += sign * h
                    final = task.rollout(protocol, n, seed, first_replica=first, gradient="none")
                    protocol.values[k, 0] -= sign * h
                metrics.append(task.metric(final).to(torch.float64))
            diffs.append((metrics[0] - metrics[1]) / (2 * h))
        d = torch.cat(diffs)
        value[k], se[k] = d.mean(), d.std() / math.sqrt(d.numel())
    return value, se


def judge(rows: list[dict[str, Any]], fd: dict[str, Any], higher_is_better: bool) -> bool:
    """Set each piece's ``sign_agrees`` and ``counted`` against the finite difference ``fd``
    (its ``value`` and ``counted`` per piece); return ``all_counted_ok``: SNR >= 1 with the
    right sign on every counted piece, and at least one piece counted."""
    improve = -1.0 if higher_is_better else 1.0  # d loss points against d metric
    for row, value, counted in zip(rows, fd["value"], fd["counted"]):
        agrees = math.copysign(1.0, row["mean"]) == math.copysign(1.0, improve * value)
        row["sign_agrees"] = bool(agrees) and row["mean"] != 0.0
        row["counted"] = bool(counted)
    counted_rows = [r for r in rows if r["counted"]]
    return bool(counted_rows) and all(r["snr"] >= 1.0 and r["sign_agrees"] for r in counted_rows)


def rejudge(estimates: Path, fd_file: Path) -> dict[str, Any]:
    """The estimators of ``estimates`` judged against the finite difference of ``fd_file``
    (same experiment, horizon, pieces and control value; the step ``fd_step`` and the noise
    are the finite difference's own; the two can run side by side)."""
    result, other = json.loads(estimates.read_text()), json.loads(fd_file.read_text())
    for key in ("experiment", "n_steps", "pieces", "control_value"):
        if result[key] != other[key]:
            raise SystemExit(
                f"--fd-from {fd_file}: its {key} is {other[key]!r}, not {result[key]!r}"
            )
    result["fd_step"] = other["fd_step"]
    result["finite_difference"] = {**other["finite_difference"], "command": other["command"]}
    for est in result["estimators"].values():
        est["all_counted_ok"] = judge(
            est["pieces"], result["finite_difference"], result["higher_is_better"]
        )
    return result


def table(path: Path) -> str:
    """A results file as a markdown table: one row per estimator, one column per piece."""
    result = json.loads(path.read_text())
    pieces = result["pieces"]
    steps = [r["steps_before_end"] for r in next(iter(result["estimators"].values()))["pieces"]]
    head = "| estimator | " + " | ".join(f"piece {k} (-{s})" for k, s in enumerate(steps))
    lines = [head + " | all counted ok | time (s) |", "|---" * (pieces + 3) + "|"]
    fd = result["finite_difference"]
    lines.append(
        "| FD of the metric (SE) | "
        + " | ".join(
            f"{v:.3g} ({e:.2g}){'*' if c else ''}"
            for v, e, c in zip(fd["value"], fd["se"], fd["counted"])
        )
        + f" | | {fd['wall_s']:.0f} |"
    )
    for name, est in result["estimators"].items():
        cells = [
            f"{r['snr'] if r['mean'] != 0 else 0.0:.2f} "  # no gradient at all: no signal
            f"{'+' if r['sign_agrees'] else '-'}{'*' if r['counted'] else ''}"
            for r in est["pieces"]
        ]
        ok = "yes" if est["all_counted_ok"] else "no"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ok} | {est['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0].endswith(".json"):  # a results file: print it, or judge it anew
        files = argparse.ArgumentParser(description="print or re-judge a results file")
        files.add_argument("results", type=Path)
        files.add_argument("--fd-from", type=Path, help="judge against this file's FD")
        files.add_argument("--json", type=Path, help="write the re-judged results here")
        given = files.parse_args(argv)
        if (given.fd_from is None) != (given.json is None):
            files.error("--fd-from and --json go together")
        if given.fd_from is not None:
            given.json.write_text(
                json.dumps(rejudge(given.results, given.fd_from), indent=1) + "\n"
            )
        print(table(given.json or given.results))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("--budget", type=float, default=1e6, help="replica-steps per estimate")
    parser.add_argument("--pieces", type=int, default=8)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--estimators", nargs="+", default=list(ESTIMATOR_CHOICES), choices=ESTIMATOR_CHOICES
    )
    parser.add_argument("--window", type=int, default=0, help="last_window steps (0: see doc)")
    parser.add_argument("--fd-step", type=float, default=0.05, help="fraction of the range")
    parser.add_argument(
        "--fd-replicas",
        type=int,
        default=-1,
        help="replicas of the finite difference (-1: as the estimators; 0: none, no piece counted)",
    )
    parser.add_argument(
        "--add-to",
        type=Path,
        default=None,
        help="a results file of the same settings: reuse its finite difference, keep its "
        "estimators and add this run's (write with --json, e.g. to the same file)",
    )
    parser.add_argument("--chunk", type=int, default=64, help="replicas simulated at once")
    parser.add_argument(
        "--fd-chunk",
        type=int,
        default=0,
        help="replicas per finite-difference rollout (0: --chunk)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/gradient_snr.py " + " ".join(argv)

    cfg = load_config(args.experiment, args.overrides)
    with use_rng(cfg["experiment"]["rng"]):  # the experiment's noise streams
        return measure(args, cfg, command)


def measure(args: argparse.Namespace, cfg: dict[str, Any], command: str) -> int:
    """Run the finite difference and every estimator; write and print the results."""
    surrogate_cfg = {**cfg, "task": {k: v for k, v in cfg["task"].items() if k != "surrogate"}}
    task = build_task(surrogate_cfg)  # the smooth surrogate (pathwise estimators)
    exact_task = ExactMetricLoss(build_task(cfg))
    init = cfg["protocol"].get("init")
    default = task.default_control()
    value = float(init) if isinstance(init, int | float) else float(default[0])  # type: ignore[index]
    replicas = max(int(args.budget // task.n_steps), args.groups)
    per_group = replicas // args.groups
    replicas = per_group * args.groups
    train = cfg["train"]
    window = args.window or (
        train["window"] if train["gradient"] == "truncated" else task.n_steps // args.pieces
    )
    lo, hi = task.controls.low[0], task.controls.high[0]
    h = args.fd_step * (hi - lo)
    piece_steps = task.n_steps / args.pieces
    result: dict[str, Any] = {
        "experiment": cfg["experiment"]["name"],
        "task": task.name,
        "metric": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "n_steps": task.n_steps,
        "dt": task.dt,
        "pieces": args.pieces,
        "piece_steps": piece_steps,
        "control": task.controls.names[0],
        "control_value": value,
        "budget_replica_steps": replicas * task.n_steps,
        "replicas": replicas,
        "groups": args.groups,
        "last_window_steps": window,
        "fd_step": h,
        "command": command,
        "rng": cfg["experiment"]["rng"],
        "loadavg_start": os.getloadavg(),
        "estimators": {},
    }

    def write() -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")

    t0 = time.perf_counter()
    fd_replicas = replicas if args.fd_replicas < 0 else args.fd_replicas
    if args.add_to is not None:  # its finite difference and estimators, this run's added
        earlier = json.loads(args.add_to.read_text())
        keys = ("experiment", "n_steps", "pieces", "budget_replica_steps", "groups", "fd_step")
        earlier.setdefault("rng", "mt19937")  # files from before the key: the only kind then
        for key in (*keys, "control_value", "rng"):
            if earlier[key] != result[key]:
                raise SystemExit(
                    f"--add-to {args.add_to}: its {key} is {earlier[key]!r}, this run's {result[key]!r}"
                )
        result["estimators"] = earlier["estimators"]
        result["commands"] = [*earlier.get("commands", [earlier["command"]]), command]
        fd = torch.tensor(earlier["finite_difference"]["value"], dtype=torch.float64)
        fd_se = torch.tensor(earlier["finite_difference"]["se"], dtype=torch.float64)
        fd_replicas = earlier["finite_difference"]["replicas"]
        fd_wall = earlier["finite_difference"]["wall_s"]
    elif fd_replicas > 0:
        fd, fd_se = finite_difference(
            task,
            piece_protocol(task, args.pieces, value),
            fd_replicas,
            args.seed + 1000,
            h,
            args.fd_chunk or args.chunk,
        )
    else:
        fd = fd_se = torch.zeros(args.pieces, dtype=torch.float64)
    counted = (fd.abs() > 3.0 * fd_se).tolist()
    result["finite_difference"] = {
        "replicas": fd_replicas,
        "value": fd.tolist(),
        "se": fd_se.tolist(),
        "counted": counted,
        "wall_s": fd_wall if args.add_to is not None else time.perf_counter() - t0,
    }
    write()
    print(
        f"{task.name}: {replicas} replicas x {task.n_steps} steps, FD {fd.tolist()} +- {fd_se.tolist()}"
    )
    for name in args.estimators:
        protocol = piece_protocol(task, args.pieces, value)
        t1 = time.perf_counter()
        if name == "score":
            G = group_gradients(
                exact_task, protocol, "score", {}, per_group, args.groups, args.seed, args.chunk, 1
            )
        elif name == "last_window":
            options = {"gradient": "truncated", "window": window}
            G = group_gradients(
                task, protocol, "pathwise", options, per_group, args.groups, args.seed, 0, 1
            )
        else:
            G = group_gradients(
                task,
                protocol,
                name,
                {"gradient": "direct"},
                per_group,
                args.groups,
                args.seed,
                args.chunk,
                args.pieces,
            )
        mean, se = G.mean(0), G.std(0) / math.sqrt(args.groups)
        rows = [
            {
                "piece": k,
                "steps_before_end": round((args.pieces - k) * piece_steps),
                "mean": float(mean[k]),
                "se": float(se[k]),
                "snr": abs(float(mean[k])) / float(se[k]) if float(se[k]) > 0 else 0.0,
            }
            for k in range(args.pieces)
        ]
        result["estimators"][name] = {
            "pieces": rows,
            "all_counted_ok": judge(rows, result["finite_difference"], task.higher_is_better),
            "wall_s": time.perf_counter() - t1,
        }
        result["loadavg_end"] = os.getloadavg()
        write()
        print(
            name,
            [
                f"{r['snr']:.2f}{'+' if r['sign_agrees'] else '-'}{'*' if r['counted'] else ''}"
                for r in rows
            ],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

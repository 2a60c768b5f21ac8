"""The gate of every control channel of a task on the same replicas: each channel alone,
held at constant values, paired against one shared no-control run.

Usage::

    python benchmarks/channel_gate.py experiments/polymer_fold.toml \
        --channel epsilon=0.25,0.5,1.5,2 --channel tweezers=-5,-1,1,5 \
        --channel bias=-0.5,-0.25,0.25,0.5 --set task.n_bias=1 \
        --set experiment.rng=philox --replicas 512 --seed 7000000 \
        --out experiments/results/polymer_gate.json

For each ``--channel NAME=V1,V2,...`` the task is built from the experiment's ``[task]``
section (``--set`` overrides apply to every channel) with ``controls = [NAME]``; the channel
must then have one control (e.g. one tweezer pair, ``n_bias = 1``). Each value is held
constant over the whole horizon and scored with the task's exact metric on the same fresh
replicas (seed ``--seed``, replica ``i`` the same initial state and noise for every
protocol: common random numbers). No control (H0 as built: the value every channel takes
when off, ``default_control()``) is run once, with the first channel's task, and every
constant is reported as its mean +- SE and its paired difference from no control (mean and
SE of the per-replica difference) with the z-score. A channel's gate: its best constant
beats no control by more than 3 paired SE.

Writes ``--out`` (JSON: per channel, per value; the command, load average and wall time)
and a markdown table next to it (same stem, ``.md``).
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
from constant_sweep import per_replica_metric, table_protocol

from controlmd.checkpoint import atomic_write_text
from controlmd.config import build_task, load_config
from controlmd.errors import ControlMDError
from controlmd.evaluation import mean_se
from controlmd.rng import use_rng
from controlmd.tasks.base import Task


def parse_channel(spec: str) -> tuple[str, list[float]]:
    """``"NAME=V1,V2,..."`` -> ``(NAME, [V1, V2, ...])``."""
    name, sep, values = spec.partition("=")
    try:
        parsed = [float(v) for v in values.split(",")]
    except ValueError:
        parsed = []
    if not sep or not name or not parsed:
        raise ControlMDError(f"--channel expects NAME=V1,V2,..., got {spec!r}")
    return name, parsed


def channel_task(cfg: dict[str, Any], channel: str) -> Task:
    """The experiment's task with ``controls = [channel]``; one control required."""
    task = build_task({**cfg, "task": {**cfg["task"], "controls": [channel]}})
    if task.controls.dim != 1:
        raise ControlMDError(
            f"--channel {channel}: the task has {task.controls.dim} controls "
            f"{task.controls.names}; set its options so that it has one (e.g. --set task.n_bias=1)"
        )
    return task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="experiment TOML (its [task] section is used)")
    parser.add_argument(
        "--channel", action="append", required=True, metavar="NAME=V1,V2,...", type=parse_channel
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    parser.add_argument("--replicas", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--seed", type=int, default=7_000_000)
    parser.add_argument("--out", type=Path, required=True, help="JSON output path")
    args = parser.parse_args(argv)
    command = "python benchmarks/channel_gate.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )

    cfg = load_config(args.experiment, args.overrides)
    tasks = {name: channel_task(cfg, name) for name, _ in args.channel}
    opts = {"replicas": args.replicas, "chunk": args.chunk, "seed": args.seed}
    t0 = time.perf_counter()
    load_start = os.getloadavg()

    def scored(task: Task, value: float) -> torch.Tensor:
        t1 = time.perf_counter()
        with use_rng(cfg["experiment"]["rng"]):
            v = per_replica_metric(task, table_protocol(task, value, value), **opts)
        mean, se = mean_se(v)
        print(
            f"{task.controls.names[0]:>12s} {value:8.4g}: {mean:.4f} +- {se:.4f} "
            f"({time.perf_counter() - t1:.0f} s)",
            flush=True,
        )
        return v

    first = tasks[args.channel[0][0]]
    v0 = scored(first, float(first.default_control()[0]))  # type: ignore[index]
    mean0, se0 = mean_se(v0)
    result: dict[str, Any] = {
        "task": first.name,
        "task_params": {k: v for k, v in cfg["task"].items() if k not in ("name", "controls")},
        "metric_name": first.metric_name,
        "higher_is_better": first.higher_is_better,
        "replicas": args.replicas,
        "seed": args.seed,
        "rng": cfg["experiment"]["rng"],
        "n_steps": first.n_steps,
        "no_control": {"mean": mean0, "se": se0},
        "channels": {},
        "command": command,
        "loadavg_start": load_start,
    }
    sign = 1.0 if first.higher_is_better else -1.0
    for name, values in args.channel:
        task = tasks[name]
        rows = []
        for value in values:
            v = scored(task, value)
            mean, se = mean_se(v)
            diff, diff_se = mean_se(v - v0)
            z = (
                diff / diff_se
                if diff_se > 0
                else (0.0 if diff == 0 else math.copysign(math.inf, diff))
            )
            rows.append(
                {
                    "value": value,
                    "mean": mean,
                    "se": se,
                    "paired": diff,
                    "paired_se": diff_se,
                    "z": z,
                }
            )
        best = max(rows, key=lambda r: sign * r["mean"])
        result["channels"][name] = {
            "control": task.controls.names[0],
            "unit": task.controls.units[0],
            "bounds": [task.controls.low[0], task.controls.high[0]],
            "no_control_value": float(task.default_control()[0]),  # type: ignore[index]
            "values": rows,
            "best": best,
            "gate": bool(sign * best["z"] > 3.0),
        }
        result["wall_s"] = time.perf_counter() - t0
        result["loadavg_end"] = os.getloadavg()
        atomic_write_text(args.out, json.dumps(result, indent=2))
        atomic_write_text(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    """The gate table: one row per channel and value, the best of each channel in bold."""
    lines = [
        f"Channel gate: {r['task']} ({r['metric_name']}), each channel alone held constant, "
        f"{r['replicas']} replicas (seed {r['seed']}, rng {r['rng']}), {r['n_steps']} steps; "
        f"no control {r['no_control']['mean']:.4f} +- {r['no_control']['se']:.4f}.",
        "",
        "| channel | constant | metric | SE | paired vs no control | z | gate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in r["channels"].items():
        for row in c["values"]:
            mark = "**" if row is c["best"] else ""
            lines.append(
                f"| {name} ({c['unit']}) | {mark}{row['value']:.4g}{mark} | {row['mean']:.4f} "
                f"| {row['se']:.4f} | {row['paired']:+.4f} +- {row['paired_se']:.4f} "
                f"| {row['z']:+.1f} | {'passes' if c['gate'] and row == c['best'] else ''} |"
            )
    lines += [
        "",
        f"Command: `{r['command']}` ({r.get('wall_s', 0):.0f} s, load "
        f"{r['loadavg_start'][0]:.1f} -> {r.get('loadavg_end', r['loadavg_start'])[0]:.1f})",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

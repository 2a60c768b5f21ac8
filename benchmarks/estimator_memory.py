"""Peak memory and time of one training iteration per gradient estimator and replica count.

Usage::

    python benchmarks/estimator_memory.py experiments/polymer_fold.toml \
        --replicas 128 512 2048 --estimators pathwise score multiwindow --chunk 64 \
        [--set task.n_steps=200] [--json FILE]

Each (estimator, replicas) pair runs in its own subprocess (so peak RSS is its own): it
builds the experiment's task and protocol, then times one
``Trainer.estimate_gradient`` (a training iteration's gradient; ``score`` on the task's
configured loss, ``pathwise``, ``multiwindow`` and ``mixed`` on the smooth surrogate, the last
two with ``--windows`` windows) and reads the process's peak resident set size (``VmHWM``)
before and after. With ``--chunk`` > 0 the estimators simulate blocks of that many
replicas (``[train] chunk``), so the peak should not grow with the replica count;
``pathwise`` is also run with ``chunk = 0`` (``pathwise_whole``), today's default, for
comparison. The simulation's gradient path is the experiment's ``[train] gradient`` and
``window`` (``--set train.gradient=checkpoint --set train.window=50``: stored states, each
window's noise replayed). Prints a table; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from controlmd.config import build_protocol, build_task, load_config
from controlmd.train import Trainer

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024.0
    return float("nan")

exp, overrides, estimator, replicas, chunk, windows = json.loads(sys.argv[1])
cfg = load_config(exp, overrides)
if estimator != "score":
    cfg["task"] = {k: v for k, v in cfg["task"].items() if k != "surrogate"}
task = build_task(cfg)
protocol = build_protocol(cfg, task)
name = "pathwise" if estimator == "pathwise_whole" else estimator
train = cfg["train"]
trainer = Trainer(task, protocol, replicas=replicas, estimator=name, chunk=chunk,
                  windows=windows if name in ("multiwindow", "mixed") else 1, variance_every=0,
                  gradient=train["gradient"], window=train["window"] or None)
before = hwm()
t0 = time.perf_counter()
trainer.estimate_gradient(0)
wall = time.perf_counter() - t0
print(json.dumps({"estimator": estimator, "replicas": replicas, "chunk": chunk,
                  "rss_before_mb": before, "peak_rss_mb": hwm(), "wall_s": wall,
                  "n_steps": task.n_steps}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("--replicas", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument(
        "--estimators", nargs="+", default=["pathwise_whole", "pathwise", "score", "multiwindow"]
    )
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    command = "python benchmarks/estimator_memory.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    rows = []
    print("| estimator | replicas | chunk | peak RSS (MB) | RSS before (MB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for estimator in args.estimators:
        for replicas in args.replicas:
            chunk = 0 if estimator == "pathwise_whole" else args.chunk
            spec = [args.experiment, args.overrides, estimator, replicas, chunk, args.windows]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                    env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                )
            except subprocess.TimeoutExpired:
                row = {"estimator": estimator, "replicas": replicas, "error": "timeout"}
            else:
                if proc.returncode != 0:
                    row = {
                        "estimator": estimator,
                        "replicas": replicas,
                        "error": proc.stderr.strip().splitlines()[-1:],
                    }
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["subprocess_s"] = time.perf_counter() - t0
            rows.append(row)
            if "error" in row:
                print(f"| {estimator} | {replicas} | {chunk} | {row['error']} | | |", flush=True)
            else:
                print(
                    f"| {estimator} | {replicas} | {chunk} | {row['peak_rss_mb']:.0f} | "
                    f"{row['rss_before_mb']:.0f} | {row['wall_s']:.1f} |",
                    flush=True,
                )
            if args.json is not None:
                payload = {"command": command, "loadavg": os.getloadavg(), "rows": rows}
                args.json.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"Command: `{command}` (load average {os.getloadavg()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Paired test of trained protocols against a constant control on the same fresh replicas.

Usage::

    python benchmarks/paired_test.py runs/assembly_final_window_study/seed{0,1,2} \
        --constant 6 --replicas 2048 --json experiments/results/assembly_final_window_paired.json

For each run folder (``controlmd run`` output: ``config.toml``, ``protocol.pt``) the trained
protocol and the constant control ``--constant`` (the sweep's best constant) are scored
with the task's exact metric on the same ``--replicas`` fresh replicas: replica ``i`` of run
``r`` draws the noise stream of seed ``--seed + r`` under both protocols (common random
numbers), so the per-replica differences ``d_i = m_i(trained) - m_i(constant)`` carry only
the effect of the protocol. Reported: per run and pooled over runs, ``mean(d)``, its
standard error ``sd(d) / sqrt(n)``, ``z = mean / SE``, and for 0/1 metrics the counts of
replicas gained and lost. The default seed is disjoint from every training, evaluation and
sweep stream of these experiments (streams are ``seed + i * 1_000_003``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from controlmd.checkpoint import atomic_write_json
from controlmd.config import build_task, read_run_config
from controlmd.protocols import load_protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from constant_sweep import per_replica_metric, table_protocol


def _summary(d: torch.Tensor) -> dict[str, float]:
    se = float(d.std(unbiased=True)) / math.sqrt(d.numel())
    mean = float(d.mean())
    return {
        "mean_difference": mean,
        "se": se,
        "z": mean / se if se > 0 else math.inf,
        "n": int(d.numel()),
        "gained": int((d > 0).sum()),
        "lost": int((d < 0).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding protocol.pt")
    parser.add_argument("--constant", type=float, required=True, help="the constant control value")
    parser.add_argument("--replicas", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--seed", type=int, default=3_141_593)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    t0 = time.perf_counter()
    rows, diffs = [], []
    for r, run in enumerate(args.runs):
        task = build_task(read_run_config(run))
        trained = load_protocol(run / "protocol.pt")
        constant = table_protocol(task, args.constant, args.constant)
        seed = args.seed + r
        m_trained = per_replica_metric(
            task, trained, replicas=args.replicas, chunk=args.chunk, seed=seed
        )
        m_constant = per_replica_metric(
            task, constant, replicas=args.replicas, chunk=args.chunk, seed=seed
        )
        d = m_trained - m_constant
        diffs.append(d)
        row = {
            "run": str(run),
            "seed": seed,
            "trained": float(m_trained.mean()),
            "constant": float(m_constant.mean()),
            **_summary(d),
        }
        rows.append(row)
        print(
            f"{run}: trained {row['trained']:.4f}, constant {row['constant']:.4f}, difference "
            f"{row['mean_difference']:+.4f} +- {row['se']:.4f} (z = {row['z']:.1f}; "
            f"+{row['gained']} / -{row['lost']} of {row['n']})",
            flush=True,
        )
    pooled = _summary(torch.cat(diffs))
    print(
        f"pooled over {len(rows)} runs: difference {pooled['mean_difference']:+.4f} +- {pooled['se']:.4f} "
        f"(z = {pooled['z']:.1f}; +{pooled['gained']} / -{pooled['lost']} of {pooled['n']}) "
        f"[{time.perf_counter() - t0:.0f} s]"
    )
    if args.json is not None:
        atomic_write_json(
            args.json,
            {
                "constant": args.constant,
                "replicas": args.replicas,
                "runs": rows,
                "pooled": pooled,
                "command": " ".join(["python", *sys.argv]),
            },
        )


if __name__ == "__main__":
    main()

"""Throughput cost of MKL's reproducibility modes: ``MKL_CBWR=COMPATIBLE``
(bitwise-reproducible runs across processes, MKL's CPU-independent code path, docs/reliability.md),
the CLI's default ``MKL_CBWR=AUTO`` (as reproducible, MKL's fast dispatch) and ``CONTROLMD_MKL_CBWR=off`` (MKL's own
dispatch).

Runs ``controlmd run EXPERIMENT`` in fresh processes, rotating through the settings, and
reports the median child CPU time of each over ``--runs`` interleaved rounds, and whether
the runs of each setting agree bit for bit.

    python benchmarks/mkl_cbwr.py experiments/demo.toml --runs 5 --set train.iterations=10 \
        --json cbwr.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "compatible": {"MKL_CBWR": "COMPATIBLE"},
    "auto": {},  # the CLI's default
    "off": {"CONTROLMD_MKL_CBWR": "off"},
}


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(
    experiment: Path, overrides: list[str], env: dict[str, str], out: Path
) -> tuple[float, str]:
    """CPU seconds of one ``controlmd run`` process and the digest of its protocol.pt."""
    cmd = [sys.executable, "-m", "controlmd", "run", str(experiment), "--out", str(out), "--quiet"]
    for item in overrides:
        cmd += ["--set", item]
    before = _child_cpu()
    subprocess.run(
        cmd,
        check=True,
        stdout=subprocess.DEVNULL,
        env={**{k: v for k, v in os.environ.items() if k != "MKL_CBWR"}, **env},
    )
    cpu = _child_cpu() - before
    return cpu, hashlib.sha256((out / "protocol.pt").read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--runs", type=int, default=5, help="interleaved pairs (default 5)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (default 1)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    cpu: dict[str, list[float]] = {name: [] for name in SETTINGS}
    digests: dict[str, set[str]] = {name: set() for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            order = list(SETTINGS) if i % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                env = {**SETTINGS[name], "OMP_NUM_THREADS": str(args.threads)}
                seconds, digest = run_once(
                    args.experiment, args.overrides, env, Path(tmp) / f"{name}{i}"
                )
                cpu[name].append(seconds)
                digests[name].add(digest)
                print(f"run {i} {name:10s} cpu {seconds:7.2f} s", flush=True)
    med = {name: statistics.median(v) for name, v in cpu.items()}
    result = {
        "experiment": str(args.experiment),
        "overrides": args.overrides,
        "threads": args.threads,
        "runs": args.runs,
        "cpu_s": cpu,
        "median_cpu_s": med,
        "cost_vs_off": {name: med[name] / med["off"] - 1.0 for name in SETTINGS},
        "distinct_results": {name: len(d) for name, d in digests.items()},
        "load_average": os.getloadavg(),
    }
    costs = ", ".join(
        f"{name} {med[name]:.2f} ({100 * result['cost_vs_off'][name]:+.1f} %)" for name in SETTINGS
    )
    print(
        f"median CPU s (vs off): {costs}; distinct protocol.pt per setting: "
        f"{result['distinct_results']}; load {result['load_average'][0]:.1f}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

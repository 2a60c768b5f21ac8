"""Bitwise repeatability inside one process: how often two identical computations differ.

Two probes, both run under whatever ``MKL_CBWR`` / ``MKL_DYNAMIC`` / ``OMP_NUM_THREADS`` the
environment sets (set them on the command line; docs/reliability.md has the results):

* ``training``: the seeded training of
  ``tests/test_train.py::test_seeded_runs_are_identical_and_seeds_matter`` (``TrapDrag`` with
  20 steps, a degree-2 Chebyshev protocol fitted to the linear drag, 8 replicas, 3 Adam
  steps), repeated ``--runs`` times; counts the runs whose coefficients differ from the
  first run's in any bit.
* ``lstsq``: ``torch.linalg.lstsq`` of one 64 x 3 float64 problem, repeated ``--runs`` times
  per LAPACK driver (fresh copies of the operands, the allocator's state varied between
  calls); counts solutions that differ from the first.

    MKL_CBWR=AUTO OMP_NUM_THREADS=2 python benchmarks/repeat_in_process.py training --runs 400
    OMP_NUM_THREADS=1 python benchmarks/repeat_in_process.py lstsq --runs 3000
"""

from __future__ import annotations

import argparse
import os

import torch

from controlmd.protocols import make_protocol
from controlmd.tasks.trap_drag import TrapDrag
from controlmd.train import Trainer


def training_mismatches(runs: int) -> int:
    """Runs (of ``runs``) whose trained coefficients differ from the first run's."""
    task = TrapDrag(n_steps=20)
    lo, hi = task.make_protocol_bounds()

    def train() -> torch.Tensor:
        protocol = make_protocol(
            "chebyshev",
            dim=1,
            t_final=task.t_f,
            low=float(lo),
            high=float(hi),
            degree=2,
            init=[0.0, task.lambda_f],
        )
        Trainer(task, protocol, replicas=8, lr=0.05, seed=0).learn(3)
        return protocol.coef.detach().clone()

    first = train()
    return sum(not torch.equal(train(), first) for _ in range(runs))


def lstsq_mismatches(runs: int) -> dict[str, int]:
    """Per LAPACK driver: solutions (of ``runs``) that differ from the first one's."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(64, 3, dtype=torch.float64, generator=gen)
    b = torch.randn(64, 1, dtype=torch.float64, generator=gen)
    counts = {}
    for driver in ("gelsy", "gelsd", "gels", "gelss"):
        first = torch.linalg.lstsq(A, b, driver=driver).solution
        held = []
        bad = 0
        for i in range(runs):
            held.append(torch.empty(i % 17 + 1))  # a different allocator state for each call
            bad += not torch.equal(
                torch.linalg.lstsq(A.clone(), b.clone(), driver=driver).solution, first
            )
        counts[driver] = bad
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["training", "lstsq"])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args(argv)
    setting = (
        f"MKL_CBWR={os.environ.get('MKL_CBWR')} MKL_DYNAMIC={os.environ.get('MKL_DYNAMIC')} "
        f"threads={torch.get_num_threads()}"
    )
    if args.probe == "training":
        print(f"{setting} training runs={args.runs} differing={training_mismatches(args.runs)}")
    else:
        print(f"{setting} lstsq runs={args.runs} differing={lstsq_mismatches(args.runs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

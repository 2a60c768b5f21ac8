"""Signal-to-noise ratio of the gradient of the 500-step hairpin's loss with respect to the
per-torsion bias amplitudes (issue 17), per estimator.

The hairpin of ``experiments/polymer_handmade_hairpin.toml`` (22 beads, bath kT = 0.4, 500
Langevin steps) under a native-torsion bias held at ``--turn`` on the five turn torsions
(7-11, the ones whose native angle is not 180 degrees) and ``--strands`` on the other 14,
released on the last 10 %. The 19 amplitudes are unbounded parameters, so the gradient is
``d loss / d a_k`` in 1/epsilon. ``--groups`` independent groups of ``--replicas`` replicas
(batch seeds 5000, 5001, ...) each give one estimate; the script prints each group's loss and
then, per torsion, the mean, standard error and ``snr = mean / se`` (signed: negative means a
stronger bias on that torsion lowers the loss)::

    python experiments/polymer_hairpin_gradient_snr.py --estimator score --groups 8 --replicas 64
    python experiments/polymer_hairpin_gradient_snr.py --estimator pathwise --groups 8 --replicas 64

``score`` is the score-function estimator of the surrogate at T (unbiased, it sees a chain
switching basins); ``pathwise`` differentiates the surrogate through the whole run with the
noise fixed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from controlmd.checkpoint import atomic_write_text
from controlmd.config import build_task, load_config
from controlmd.distributed import DistributedContext
from controlmd.estimators import RolloutBatch, make_estimator
from controlmd.evaluation import mean_se
from controlmd.protocols import PiecewiseConstant

ROOT = Path(__file__).resolve().parent.parent
TURN = range(7, 12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--estimator", choices=["pathwise", "score"], default="score")
    ap.add_argument("--turn", type=float, default=10.0, help="turn torsions' amplitude (eps)")
    ap.add_argument("--strands", type=float, default=10.0, help="other torsions' amplitude")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write the groups and the summary here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = build_task(load_config(ROOT / "experiments/polymer_handmade_hairpin.toml"))
    init = [args.turn if k in TURN else args.strands for k in range(task.controls.dim)]
    protocol = PiecewiseConstant(
        dim=task.controls.dim,
        t_final=task.horizon,
        n_pieces=1,
        init=init,
        release_fraction=0.1,
        release_value=task.default_control(),
    )
    estimator = make_estimator(args.estimator)
    groups, rows = [], []
    for g in range(args.groups):
        t0 = time.perf_counter()
        batch = RolloutBatch(
            task=task,
            protocol=protocol,
            params=[protocol.values],
            replicas=args.replicas,
            shard=DistributedContext().shard(args.replicas),
            grad_groups=0,
        )
        estimate = estimator.estimate(batch, 5000 + g, with_variance=False)
        rows.append(estimate.grads[0].detach().flatten().tolist())
        groups.append({"group": g, "loss": float(estimate.loss), "grad": rows[-1]})
        print(json.dumps({"group": g, "loss": groups[-1]["loss"],
                          "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)  # fmt: skip
    per_torsion = []
    for column in torch.tensor(rows, dtype=torch.float64).T:
        mean, se = mean_se(column)
        per_torsion.append({"mean": mean, "se": se, "snr": mean / se})
    summary = {
        "estimator": args.estimator,
        "turn": args.turn,
        "strands": args.strands,
        "replicas": args.groups * args.replicas,
        "snr": [round(t["snr"], 2) for t in per_torsion],
    }
    print(json.dumps(summary), flush=True)
    if args.json is not None:
        record = {**summary, "per_torsion": per_torsion, "groups": groups}
        atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Signal-to-noise ratio of the gradient of ``assembly``'s bond-count loss with respect to the
radial wave's schedule (issue 15, weak regime), per estimator.

The wave of ``experiments/assembly_wave_handmade.toml`` (wavelength 0.8, core 1.2, eps = 6)
is driven by a two-knot linear table ``[[A, 0], [A, v 0.9 T]]`` at ``t = 0`` and ``0.9 T``
(amplitude ``A``, phase ``s = v t``), released on the last 10 %. Its values are the
parameters, unbounded, so the gradient is ``d loss / d s`` and ``d loss / d A`` at each knot
in the channel's unit. ``--groups`` independent groups of ``--replicas`` replicas (seeds
1000, 1001, ...) each give one estimate; the script prints each group's and then the mean,
standard error and ``snr = |mean| / se`` per entry (``ds0, ds1, dA0, dA1``). A negative
``ds1`` means a faster wave lowers the loss (more bonds)::

    python experiments/assembly_wave_gradient_snr.py --estimator multiwindow --speed 2 --groups 8 --replicas 16
    python experiments/assembly_wave_gradient_snr.py --estimator pathwise --speed 2 --groups 8 --replicas 16

``multiwindow`` uses 12 windows of 500 steps (checkpoints every 100 steps); ``pathwise`` the
whole horizon (checkpoints every 500 steps); ``score`` the score-function estimator on the
exact yield (``surrogate = "yield"``, loss ``1 - yield``), unbiased for it. ``--surrogate
gather`` differentiates the mean squared pair distance instead of the bond count.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from controlmd.distributed import DistributedContext
from controlmd.estimators import RolloutBatch, make_estimator
from controlmd.evaluation import mean_se
from controlmd.protocols import Tabulated
from controlmd.tasks.assembly import Assembly

ENTRIES = ("ds0", "ds1", "dA0", "dA1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--estimator", choices=["pathwise", "multiwindow", "score"], default="multiwindow"
    )
    ap.add_argument("--speed", type=float, default=2.0, help="v (sigma/tau)")
    ap.add_argument("--amplitude", type=float, default=3.0, help="A (kT)")
    ap.add_argument(
        "--surrogate",
        choices=["bonds", "gather"],
        default="bonds",
        help="pathwise estimators' loss",
    )
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = Assembly(
        controls=["wave"],
        wave_wavelength=0.8,
        wave_inner=1.2,
        field_cost_every=20,
        surrogate="yield" if args.estimator == "score" else args.surrogate,
    )
    end = 0.9 * task.horizon
    protocol = Tabulated(
        times=[0.0, end],
        values=[[args.amplitude, 0.0], [args.amplitude, args.speed * end]],
        interpolation="linear",
        t_final=task.horizon,
        release_fraction=0.1,
        release_value=task.default_control(),
    )
    multi = args.estimator == "multiwindow"
    estimator = make_estimator(args.estimator, windows=12 if multi else 1)
    options = {"gradient": "checkpoint", "window": 100 if multi else 500}
    rows = []
    for g in range(args.groups):
        t0 = time.perf_counter()
        batch = RolloutBatch(
            task=task,
            protocol=protocol,
            params=[protocol.values],
            replicas=args.replicas,
            shard=DistributedContext().shard(args.replicas),
            simulate_options=options,
            grad_groups=0,
        )
        estimate = estimator.estimate(batch, 1000 + g, with_variance=False)
        grad = estimate.grads[0].detach()  # [knot, channel (A, s)]
        rows.append([float(grad[0, 1]), float(grad[1, 1]), float(grad[0, 0]), float(grad[1, 0])])
        row = {"group": g, "loss": float(estimate.loss), **dict(zip(ENTRIES, rows[-1]))}
        print(json.dumps({**row, "wall_s": time.perf_counter() - t0}), flush=True)
    summary: dict[str, object] = {
        "estimator": args.estimator,
        "speed": args.speed,
        "surrogate": task.surrogate,
        "replicas": args.groups * args.replicas,
    }
    for k, column in zip(ENTRIES, torch.tensor(rows, dtype=torch.float64).T):
        mean, se = mean_se(column)
        summary[k] = {"mean": mean, "se": se, "snr": abs(mean) / se}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

"""The highest yield any protocol can reach on ``assembly`` under the release window (issue 15).

With ``[protocol] release_fraction = f`` every channel is its no-control value (eps =
``--epsilon``, 6 by default; no field) on the last ``f T``, so the yield at ``T`` is decided by the free system over
those ``f n_steps`` steps. The best a protocol can hand over at ``(1 - f) T`` is a
compact hexagon; this script measures how often a perfect hexagon (one disk ringed by six
at contact, r = sigma) is still a compact heptamer after ``k`` free steps, on fresh
replicas (only the Brownian noise differs between them). At ``k = f n_steps`` that
fraction bounds the yield of every protocol with that release window.

It also scores hand-made confinement schedules (eps = 6, k held until the release window) at
three times, per replica: the start of the release blend (0.88 T), its end (0.9 T) and ``T``
(for f = 0.1), so that
one sees whether their losses happen before or inside the free window::

    python experiments/assembly_release_ceiling.py --replicas 2048 --seed 11 \\
        --handmade 10 30 --json experiments/results/assembly_release_ceiling.json \\
        --png experiments/results/assembly_release_ceiling.png

Units: reduced LJ (sigma, epsilon, tau); steps of the task's ``dt`` (3e-4 tau).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from controlmd.dynamics import State
from controlmd.evaluation import constant_protocol, mean_se
from controlmd.files import atomic_write_text
from controlmd.protocols import Tabulated
from controlmd.tasks.assembly import Assembly


def perfect_hexagon(task: Assembly, state: State) -> State:
    """``state`` with every replica's disks placed as a perfect hexagon at the box centre:
    one disk there, six at distance sigma = 1 (the Morse minimum) at 60 degree steps."""
    angles = torch.arange(6, dtype=state.R.dtype) * (math.pi / 3)
    ring = torch.stack([angles.cos(), angles.sin()], dim=-1)
    hexagon = torch.cat([torch.zeros(1, 2, dtype=state.R.dtype), ring]) + 0.5 * task.box
    return state.replace(R=hexagon.expand_as(state.R).clone())


def survival(task: Assembly, n: int, seed: int, steps: int, every: int) -> list[dict[str, float]]:
    """Yield (mean, SE) of perfect hexagons after 0, every, 2 every, ... free steps at the
    no-control eps."""
    protocol = constant_protocol(task)
    state = perfect_hexagon(task, task.initial_state(n, seed))
    rows, done = [], 0
    for stop in range(0, steps + 1, every):
        if stop > done:
            state = task.advance(state, protocol, stop - done)
            done = stop
        mean, se = mean_se(task.metric(state))
        rows.append({"steps": stop, "yield": mean, "se": se})
    return rows


def handmade_in_time(
    task: Assembly, k: float, release_fraction: float, n: int, seed: int
) -> dict[str, Any]:
    """Per-replica yield of the confinement ``k`` held until the release window (eps = 6)
    at the start of the release blend ``(1 - f - 0.02) T``, its end ``(1 - f) T`` and
    ``T``, on the same replicas; ``kept``: of the replicas compact at the first mark, the
    fraction still compact at ``T``."""
    T = task.horizon
    protocol = Tabulated(
        times=[0.0, T],
        values=[[k], [k]],
        interpolation="hold",
        t_final=T,
        low=0.0,
        high=task.confinement_max,
        release_fraction=release_fraction,
        release_value=[0.0],
    )
    state = task.initial_state(n, seed)
    f = release_fraction
    marks = {
        "blend_start": round((0.98 - f) * task.n_steps),
        "release": round((1 - f) * task.n_steps),
        "T": task.n_steps,
    }
    yields, done = {}, 0
    for name, stop in marks.items():
        state = task.advance(state, protocol, stop - done)
        done = stop
        yields[name] = task.metric(state)
    before, end = yields["blend_start"], yields["T"]
    return {
        "k": k,
        **{f"yield_{name}": mean_se(y)[0] for name, y in yields.items()},
        "se_T": mean_se(end)[1],
        "kept": float((before * end).sum() / before.sum().clamp(min=1)),
        "formed_in_window": int(((1 - before) * end).sum()),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["perfect_hexagon"]
    steps = [r["steps"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.errorbar(
        steps,
        [r["yield"] for r in rows],
        [r["se"] for r in rows],
        fmt="o-",
        ms=3,
        label=f"perfect hexagon, free (eps = {result['epsilon']:g})",
    )
    ax.axvline(result["window_steps"], color="k", ls="--", lw=1, label="release window")
    for i, hm in enumerate(result["handmade"]):
        label = f"hand-made k = {hm['k']:g} at T"
        ax.axhline(hm["yield_T"], color=f"C{i + 1}", lw=1, ls=":", label=label)
    ax.set_xlabel("free steps (dt = 3e-4 tau)")
    ax.set_ylabel("yield (compact heptamer)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=512)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--release-fraction", type=float, default=0.1)
    ap.add_argument("--every", type=int, default=60, help="free steps between yield readings")
    ap.add_argument("--handmade", type=float, nargs="*", default=[], help="confinement k values")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--n-steps", type=int, default=6000, help="the task's horizon in steps")
    ap.add_argument(
        "--epsilon", type=float, default=6.0, help="the task's (no-control) Morse depth"
    )
    args = ap.parse_args(argv)
    task = Assembly(
        controls=["confinement"],
        confinement_max=100.0,
        n_steps=args.n_steps,
        epsilon=args.epsilon,
    )
    window = round(args.release_fraction * task.n_steps)
    with torch.no_grad():
        rows = survival(task, args.replicas, args.seed, 2 * window, args.every)
        handmade = [
            handmade_in_time(task, k, args.release_fraction, args.replicas, args.seed)
            for k in args.handmade
        ]
    ceiling = min(rows, key=lambda r: abs(r["steps"] - window))
    result = {
        "command": "python experiments/assembly_release_ceiling.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v not in (None, [])
        ),
        "replicas": args.replicas,
        "seed": args.seed,
        "release_fraction": args.release_fraction,
        "epsilon": args.epsilon,
        "window_steps": window,
        "ceiling": ceiling,
        "perfect_hexagon": rows,
        "handmade": handmade,
    }
    atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    if args.png:
        plot(result, args.png)
    print(json.dumps({"ceiling": ceiling, "handmade": handmade}))


if __name__ == "__main__":
    main()

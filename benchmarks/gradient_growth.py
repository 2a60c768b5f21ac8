"""How the pathwise gradient of a final-state loss grows with the distance from the end.

Usage::

    python benchmarks/gradient_growth.py experiments/polymer_fold.toml --steps 400 --pieces 8 \
        --replicas 16 --seeds 3 [--set task.kT=0.5] [--gradient checkpoint --window 50]

Builds the experiment's task with ``n_steps = --steps``, a K-piece piecewise-constant
protocol held at the task's no-control value, and differentiates the task's surrogate
loss through the whole trajectory (``--gradient direct`` or ``checkpoint``). Prints, for
each piece (piece K ends at the final state), the mean over seeds of ``|dL/du_k|`` (u in
the channel's unit) and the fraction of seeds that agree in sign with the seed mean.
Chaotic dynamics show up as ``|dL/du_k|`` growing geometrically toward early pieces with
signs that no longer agree: those pieces' pathwise gradients carry no usable signal.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from controlmd.config import build_task, load_config
from controlmd.protocols import PiecewiseConstant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--pieces", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--gradient", default="direct", choices=["direct", "checkpoint"])
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON line instead of a table"
    )
    args = parser.parse_args(argv)

    cfg = load_config(args.experiment, [*args.overrides, f"task.n_steps={args.steps}"])
    cfg["task"] = {k: v for k, v in cfg["task"].items() if k != "surrogate"}  # the smooth loss
    task = build_task(cfg)
    u0 = (
        task.default_control()
        if hasattr(task, "default_control")
        else 0.5 * (task.controls.low_tensor() + task.controls.high_tensor())
    )
    grads = []
    t0 = time.perf_counter()
    for s in range(args.seeds):
        protocol = PiecewiseConstant(
            dim=task.controls.dim,
            t_final=task.horizon,
            n_pieces=args.pieces,
            init=u0.expand(args.pieces, -1).clone(),
        )
        options = {"gradient": args.gradient}
        if args.gradient == "checkpoint":
            options["window"] = args.window
        final = task.rollout(protocol, args.replicas, 1000 + s, **options)
        task.loss(final).backward()
        # no bounds: raw values are the control values themselves
        grads.append(protocol.values.grad[:, 0].clone())
    G = torch.stack(grads)  # [seeds, K]
    mean = G.mean(0)
    mag = G.abs().mean(0)
    agree = (torch.sign(G) == torch.sign(mean)).to(torch.float64).mean(0)
    piece_steps = args.steps / args.pieces
    result = {
        "task": task.name,
        "steps": args.steps,
        "dt": task.dt,
        "pieces": args.pieces,
        "replicas": args.replicas,
        "seeds": args.seeds,
        "gradient": args.gradient,
        "mean_abs_grad": mag.tolist(),
        "sign_agreement": agree.tolist(),
        "growth_per_piece": (
            math.exp(math.log(float(mag[0]) / float(mag[-1])) / (args.pieces - 1))
            if float(mag[-1]) > 0 and float(mag[0]) > 0
            else None
        ),
        "wall_s": time.perf_counter() - t0,
        "command": "python benchmarks/gradient_growth.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{task.name}: {args.steps} steps (dt = {task.dt:g}), {args.pieces} pieces of {piece_steps:g} steps, "
        f"{args.replicas} replicas x {args.seeds} seeds, {args.gradient} backprop"
    )
    print("| piece | steps before the end | mean abs dL/du | sign agreement |")
    print("| --- | --- | --- | --- |")
    for k in range(args.pieces):
        print(
            f"| {k} | {int((args.pieces - k) * piece_steps)} | {float(mag[k]):.3g} | {float(agree[k]):.2f} |"
        )
    print(f"geometric growth per piece (first vs last): {result['growth_per_piece']}")
    print(f"Command: `{result['command']}` ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

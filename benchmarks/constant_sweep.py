"""The control gate and the baselines of a one-channel task: exact metric vs a constant
control swept over its range, no control, and linear ramps, all by the same code; with
``--holds-only``, hand-made schedules of a task with any number of channels.

Usage::

    python benchmarks/constant_sweep.py experiments/assembly.toml \
        [--set task.n_steps=4000] [--n-values 9 | --values 2,4,6] [--replicas 512] \
        [--chunk 256] [--seed 7] [--out experiments/results/assembly_sweep.json]

The task is built from the experiment file's ``[task]`` section (``--set`` overrides as in
``controlmd run``). Every protocol is scored on the same fresh replicas (seed ``--seed``,
common random numbers; noise from the experiment's ``[experiment] rng``, e.g. ``--set
experiment.rng=philox``), ``--replicas`` of them, with the task's exact metric; the table
gives mean +- standard error and the paired difference from no control (mean +- SE of the
per-replica difference). Protocols:

* ``constant`` at each value of the sweep (``--n-values`` equally spaced over the channel's
  bounds, or ``--values``);
* ``no_control``: the task's ``default_control()`` (H0 as built: e.g. the bath
  temperature, epsilon scale 1, zero force/bias), or the middle of the bounds;
* ``ramp_up`` / ``ramp_down``: linear from the lower to the upper bound and back;
* ``--hold LABEL=F0:V0,F1:V1,...`` (repeatable): a hand-made piecewise-constant protocol
  holding value ``Vi`` from time fraction ``Fi`` of the horizon (``F0 = 0``) on; on a task
  with several channels (``--holds-only`` only) ``Vi`` names one value per channel in the
  order of ``[task] controls``, separated by ``/`` (``0:0.7/5,0.3:0.5/5,0.9:0.5/0``).

The gate (printed and stored under ``gate``): the sweep's maximum is interior and exceeds
both end values by more than 2 combined standard errors (non-monotone), and it lies
below 1 by more than 3 standard errors. Writes ``--out`` (JSON), a markdown table and a
plot next to it (same stem, ``.md`` and ``.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from controlmd.checkpoint import atomic_write_text
from controlmd.config import build_task, load_config
from controlmd.errors import ControlMDError
from controlmd.evaluation import mean_se
from controlmd.protocols import Protocol, Tabulated
from controlmd.rng import use_rng
from controlmd.tasks.base import Task


def per_replica_metric(
    task: Task, protocol: Protocol, *, replicas: int, chunk: int, seed: int
) -> torch.Tensor:
    """Exact metric of ``protocol`` on each of ``replicas`` fresh replicas ``[replicas]``
    (replica ``i`` gets the same noise stream for any protocol and any ``chunk``)."""
    values = []
    done = 0
    with torch.no_grad():
        while done < replicas:
            b = min(chunk, replicas - done)
            state = task.rollout(protocol, b, seed, first_replica=done, gradient="none")
            values.append(task.metric(state).detach().to(torch.float64))
            done += b
    return torch.cat(values)


def score(
    task: Task, protocol: Protocol, *, replicas: int, chunk: int, seed: int
) -> tuple[dict[str, float], torch.Tensor]:
    """Exact metric of ``protocol`` on ``replicas`` fresh replicas: (mean, SE, MD steps, wall;
    the per-replica values ``[replicas]``)."""
    t0 = time.perf_counter()
    v = per_replica_metric(task, protocol, replicas=replicas, chunk=chunk, seed=seed)
    mean, se = mean_se(v)
    summary = {
        "mean": mean,
        "se": se,
        "n": int(v.numel()),
        "md_steps": int(v.numel()) * task.n_steps,
        "wall_s": time.perf_counter() - t0,
    }
    return summary, v


def table_protocol(task: Task, start: float | list[float], end: float | list[float]) -> Protocol:
    """A linear ramp ``start -> end`` over the horizon (a constant when equal), unsquashed;
    a list gives one value per channel."""
    first = start if isinstance(start, list) else [start]
    last = end if isinstance(end, list) else [end]
    return Tabulated(times=[0.0, task.horizon], values=[first, last])


def hold_protocol(task: Task, spec: str) -> tuple[str, Protocol]:
    """``"LABEL=F0:V0,F1:V1,..."`` -> a protocol holding ``Vi`` from ``Fi * T`` on (``Vi``:
    ``v`` on one channel, ``v0/v1/...`` with one value per channel on several)."""
    label, sep, rows = spec.partition("=")
    dim = task.controls.dim
    try:
        pairs = []
        for row in rows.split(","):
            fraction, colon, value = row.partition(":")
            pairs.append((float(fraction), [float(v) for v in value.split("/")]))
            if not colon:
                raise ValueError
        if not sep or pairs[0][0] != 0.0:
            raise ValueError
    except ValueError:
        raise ControlMDError(
            f"--hold expects LABEL=0:V0,F1:V1,... (fractions of the horizon), got {spec!r}"
        ) from None
    controls = task.controls
    for _, v in pairs:
        if len(v) != dim:
            raise ControlMDError(
                f"--hold {spec!r}: a value names {len(v)} channel(s) but the task has {dim} "
                f"({'/'.join(controls.names)})"
            )
        for name, x, lo, hi in zip(controls.names, v, controls.low, controls.high):
            if not lo <= x <= hi:
                raise ControlMDError(
                    f"--hold {spec!r}: {name} = {x} lies outside the channel's bounds [{lo}, {hi}]"
                )
    times = [f * task.horizon for f, _ in pairs] + [task.horizon]
    values = [v for _, v in pairs] + [pairs[-1][1]]
    if times[-2] >= task.horizon:
        times, values = times[:-1], values[:-1]
    return label, Tabulated(times=times, values=values, interpolation="hold")


def gate(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    means = [s["mean"] for s in sweep]
    k = max(range(len(means)), key=means.__getitem__)
    best = sweep[k]
    interior = 0 < k < len(sweep) - 1

    def above(end: dict[str, Any]) -> float:
        return (
            (best["mean"] - end["mean"]) / math.hypot(best["se"], end["se"])
            if best["se"] + end["se"] > 0
            else math.inf
        )

    z_first, z_last = above(sweep[0]), above(sweep[-1])
    z_below_one = (1.0 - best["mean"]) / best["se"] if best["se"] > 0 else math.inf
    return {
        "best_value": best["value"],
        "best_mean": best["mean"],
        "best_se": best["se"],
        "interior_max": interior,
        "z_over_first": z_first,
        "z_over_last": z_last,
        "non_monotone": bool(interior and z_first > 2 and z_last > 2),
        "z_below_one": z_below_one,
        "max_clearly_below_1": bool(z_below_one > 3),
        "max_below_half": bool(best["mean"] + 2 * best["se"] < 0.5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="experiment TOML (its [task] section is used)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    parser.add_argument(
        "--values", help="comma-separated constant values (default: --n-values over the bounds)"
    )
    parser.add_argument("--n-values", type=int, default=9)
    parser.add_argument("--replicas", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--seed", type=int, default=7_000_000)
    parser.add_argument(
        "--hold",
        action="append",
        default=[],
        metavar="LABEL=F0:V0,F1:V1,...",
        help="extra piecewise-constant protocol (time fractions and values)",
    )
    parser.add_argument(
        "--holds-only",
        action="store_true",
        help="score only the no-control value and the --hold protocols (no sweep, no gate)",
    )
    parser.add_argument(
        "--out", help="JSON output path (default: experiments/results/<experiment>_sweep.json)"
    )
    args = parser.parse_args(argv)

    cfg = load_config(args.experiment, args.overrides)
    task = build_task(cfg)
    if task.controls.dim != 1 and not args.holds_only:
        raise ControlMDError(
            f"the sweep needs a one-channel task; {task.name!r} has channels {task.controls.names}: "
            "set [task] controls to a single channel, or score hand-made --hold schedules "
            "with --holds-only"
        )
    lo, hi = task.controls.low[0], task.controls.high[0]
    if args.values:
        values = [float(v) for v in args.values.split(",")]
    else:
        values = [lo + (hi - lo) * i / (args.n_values - 1) for i in range(args.n_values)]
    default = getattr(task, "default_control", None)
    u0s = (
        [float(v) for v in default()]
        if callable(default)
        else [0.5 * (a + b) for a, b in zip(task.controls.low, task.controls.high, strict=True)]
    )
    u0 = u0s[0]
    opts = {"replicas": args.replicas, "chunk": args.chunk, "seed": args.seed}
    t0 = time.perf_counter()

    per_replica: list[tuple[dict[str, Any], torch.Tensor]] = []

    def run(label: str, protocol: Protocol, **meta: Any) -> dict[str, Any]:
        with use_rng(cfg["experiment"]["rng"]):
            summary, values = score(task, protocol, **opts)
        result = {**meta, **summary}
        per_replica.append((result, values))
        print(
            f"{label:>22s}: {result['mean']:.4f} +- {result['se']:.4f}  ({result['wall_s']:.0f} s)",
            flush=True,
        )
        return result

    def pair_with(no_control: dict[str, Any]) -> None:
        """Add ``paired_vs_no_control`` (mean and SE of the per-replica difference) to every
        scored protocol: all ran on the same replicas and noise."""
        v0 = next(v for r, v in per_replica if r is no_control)
        for result, values in per_replica:
            diff, se = mean_se(values - v0)
            result["paired_vs_no_control"] = {"mean": diff, "se": se}

    def score_holds(into: dict[str, dict[str, Any]]) -> None:
        for spec in args.hold:
            label, protocol = hold_protocol(task, spec)
            into[f"hold {label}"] = run(label, protocol, spec=spec)

    command = "python benchmarks/constant_sweep.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.holds_only:
        shown = "/".join(f"{v:.4g}" for v in u0s)
        results = {
            "no_control": run(
                f"no control ({shown})",
                table_protocol(task, u0s, u0s),
                value=u0 if len(u0s) == 1 else u0s,
            )
        }
        score_holds(results)
        pair_with(results["no_control"])
        out = (
            Path(args.out)
            if args.out
            else Path("experiments/results") / f"{cfg['experiment']['name']}_holds.json"
        )
        doc = {
            "task": task.name,
            "metric_name": task.metric_name,
            "channel": "/".join(task.controls.names),
            "replicas": args.replicas,
            "seed": args.seed,
            "rng": cfg["experiment"]["rng"],
            "n_steps": task.n_steps,
            "protocols": results,
            "wall_s": time.perf_counter() - t0,
            "command": command,
        }
        atomic_write_text(out, json.dumps(doc, indent=2))
        lines = [
            f"| protocol | {doc['channel']} (from time fraction: value) | metric | SE "
            "| paired vs no control |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {name} | {_value_cell(b)} | {b['mean']:.4f} | {b['se']:.4f} | {_paired_cell(b)} |"
            for name, b in results.items()
        ]
        lines += ["", f"Command: `{command}` ({doc['wall_s']:.0f} s)", ""]
        atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
        print("\n".join(lines))
        return 0

    sweep = [run(f"constant {v:.4g}", table_protocol(task, v, v), value=v) for v in values]
    same = [s for s in sweep if math.isclose(s["value"], u0)]  # same replicas: same result
    no_control = (
        same[0] if same else run(f"no control ({u0:.4g})", table_protocol(task, u0, u0), value=u0)
    )
    baselines = {
        "no_control": no_control,
        "ramp_up": run("ramp up", table_protocol(task, lo, hi), start=lo, end=hi),
        "ramp_down": run("ramp down", table_protocol(task, hi, lo), start=hi, end=lo),
    }
    score_holds(baselines)
    pair_with(no_control)
    g = gate(sweep)
    baselines["best_constant"] = next(s for s in sweep if s["value"] == g["best_value"])
    out = (
        Path(args.out)
        if args.out
        else Path("experiments/results") / f"{cfg['experiment']['name']}_sweep.json"
    )
    result = {
        "task": task.name,
        "task_params": {k: v for k, v in cfg["task"].items() if k != "name"},
        "metric_name": task.metric_name,
        "channel": task.controls.names[0],
        "unit": task.controls.units[0],
        "bounds": [lo, hi],
        "replicas": args.replicas,
        "seed": args.seed,
        "rng": cfg["experiment"]["rng"],
        "n_steps": task.n_steps,
        "dt": task.dt,
        "sweep": sweep,
        "baselines": baselines,
        "gate": g,
        "md_steps": sum(s["md_steps"] for s in sweep)
        + sum(
            b["md_steps"] for k, b in baselines.items() if k not in ("best_constant", "no_control")
        ),
        "wall_s": time.perf_counter() - t0,
        "command": command,
    }
    atomic_write_text(out, json.dumps(result, indent=2))
    atomic_write_text(out.with_suffix(".md"), _markdown(result))
    _plot(result, out.with_suffix(".png"))
    print(json.dumps(g, indent=2))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


def _value_cell(b: dict[str, Any]) -> str:
    """The control value column of a scored protocol: hold spec, constant, or ramp."""
    if "spec" in b:
        return b["spec"].partition("=")[2]
    if "value" in b:
        v = b["value"]
        return "/".join(f"{x:.4g}" for x in v) if isinstance(v, list) else f"{v:.4g}"
    return f"{b['start']:.4g} -> {b['end']:.4g}"


def _paired_cell(b: dict[str, Any]) -> str:
    """Mean +- SE of the per-replica difference from no control (files from before: blank)."""
    pv = b.get("paired_vs_no_control")
    return f"{pv['mean']:+.4f} +- {pv['se']:.4f}" if pv else ""


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Gate and baselines: {r['task']} ({r['metric_name']} vs constant {r['channel']} [{r['unit']}]), "
        f"{r['replicas']} replicas each, {r['n_steps']} steps of dt = {r['dt']:g}",
        "",
        "| protocol | value | metric | SE | paired vs no control | MD steps |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in r["sweep"]:
        lines.append(
            f"| constant | {s['value']:.4g} | {s['mean']:.4f} | {s['se']:.4f} | {_paired_cell(s)} "
            f"| {s['md_steps']:.3g} |"
        )
    for name, b in r["baselines"].items():
        lines.append(
            f"| {name} | {_value_cell(b)} | {b['mean']:.4f} | {b['se']:.4f} | {_paired_cell(b)} "
            f"| {b['md_steps']:.3g} |"
        )
    g = r["gate"]
    lines += [
        "",
        f"Gate: max {g['best_mean']:.4f} +- {g['best_se']:.4f} at {g['best_value']:.4g}; interior: "
        f"{g['interior_max']}; above the ends by {g['z_over_first']:.1f} and {g['z_over_last']:.1f} SE "
        f"(non-monotone: {g['non_monotone']}); below 1 by {g['z_below_one']:.1f} SE.",
        "",
        f"Command: `{r['command']}` ({r['wall_s']:.0f} s)",
        "",
    ]
    return "\n".join(lines)


def _plot(r: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = [s["value"] for s in r["sweep"]]
    y = [s["mean"] for s in r["sweep"]]
    e = [s["se"] for s in r["sweep"]]
    ax.errorbar(x, y, yerr=e, fmt="o-", capsize=3, label="constant")
    for name, style in (("ramp_up", "--"), ("ramp_down", ":"), ("no_control", "-.")):
        b = r["baselines"][name]
        ax.axhline(b["mean"], ls=style, color="0.4", label=f"{name} {b['mean']:.3f}")
    ax.set_xlabel(f"constant {r['channel']} [{r['unit']}]")
    ax.set_ylabel(r["metric_name"])
    ax.set_title(f"{r['task']}: gate sweep ({r['replicas']} replicas)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())

"""The isomerization run report: yields per iteration, yield vs time, fields and their
spectra for the starting and the trained pulse (``controlmd report RUN_DIR``).

Units: energies and fields in eV, time in fs on the figures (hbar/eV inside).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from controlmd.checkpoint import atomic_write_json, atomic_write_text
from controlmd.config import build_task, read_run_config
from controlmd.errors import ControlMDError
from controlmd.logger import TensorBoardSink
from controlmd.plotting import save_figure
from controlmd.protocols import load_protocol
from controlmd.tasks.isomerization import FS, PAPER_YIELDS, Isomerization, field_spectrum

Tensor = torch.Tensor

__all__ = ["write_report"]


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Figures and numbers of a finished isomerization run (``controlmd report``).

    Writes into ``run_dir``: ``yield_per_iteration.png`` (the yield after each optimizer
    step, against the paper's logged yields: ``-train/loss`` when the loss is the yield,
    else the ``outcome/metric`` evaluations, e.g. of ``[eval] every = 1``),
    ``yield_vs_time.png`` (Y(t) of the starting and the trained field), ``field.png``
    (E(t) and its spectrum), ``field.csv`` (the trained field at every step, fs and eV)
    and ``isomerization_report.json``; the figures and the yields per iteration also go
    to the run's TensorBoard folder ``tb/``.

    :return: the report's numbers.
    """

    run = Path(run_dir)
    cfg = read_run_config(run)
    task = build_task(cfg)
    if not isinstance(task, Isomerization):
        raise ControlMDError(f"{run} is a run of task {task.name!r}, not isomerization")
    for name in ("protocol_initial.pt", "protocol.pt", "progress.jsonl"):
        if not (run / name).is_file():
            raise ControlMDError(f"{run} has no {name} (did the run finish?)")
    protocols = {
        "initial": load_protocol(run / "protocol_initial.pt"),
        "trained": load_protocol(run / "protocol.pt"),
    }
    losses: dict[int, float] = {}
    evaluated: dict[int, float] = {}
    for line in (run / "progress.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("train/loss") is not None:
            losses[int(row["step"])] = float(row["train/loss"])
        if row.get("outcome/metric") is not None:
            evaluated[int(row["step"])] = float(row["outcome/metric"])
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if task.fluence_max > 0 or task.min_excitation > 0:
        # the loss has penalties: outcome/metric at step i is the exact yield after i updates
        source, points = "outcome/metric", sorted(evaluated.items())
    else:
        # the loss logged at step i is -Y of the field after i - 1 updates
        source, points = "-train/loss", [(i - 1, -loss) for i, loss in sorted(losses.items())]
        if "metric_final" in metrics:
            points.append(
                (int(metrics.get("iterations", len(points))), float(metrics["metric_final"]))
            )
    yields = [y for _, y in points]

    curves: dict[str, tuple[Tensor, Tensor]] = {}
    fields: dict[str, Tensor] = {}
    spectra: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    summary: dict[str, dict[str, float]] = {}
    t_steps = (torch.arange(task.n_steps, dtype=torch.float64) + 0.5) * task.dt
    for label, protocol in protocols.items():
        curves[label] = task.yield_curve(protocol)
        with torch.no_grad():
            fields[label] = task.step_fields(protocol, 0, task.n_steps).reshape(task.n_steps)
            state = task.rollout(protocol, 1, 0, gradient="none")
            summary[label] = {
                "yield": float(task.metric(state)[0]),
                "pumped_population": float(1.0 - state.psi[0, 0].abs().square()),
                "fluence_eV2_fs": float(state.aux["fluence"][0]) / FS,
                "peak_field_eV": float(fields[label].abs().max()),
            }
        energies, power = field_spectrum(t_steps, fields[label])
        summary[label]["spectrum_peak_eV"] = float(energies[power.argmax()])
        spectra[label] = (fields[label], energies, power)

    figures = {
        "yield_per_iteration": _plot_yields(points),
        "yield_vs_time": _plot_curves(curves, task),
        "field": _plot_fields(t_steps / FS, spectra),
    }
    for name, fig in figures.items():
        save_figure(fig, run / f"{name}.png")
    rows = [
        "t_fs,E_eV",
        *(
            f"{t:.6f},{e:.12g}"
            for t, e in zip((t_steps / FS).tolist(), fields["trained"][0].tolist())
        ),
    ]
    atomic_write_text(run / "field.csv", "\n".join(rows) + "\n")
    sink = TensorBoardSink(run / "tb")
    for i, y in points:
        values = {"isomerization/yield": y}
        if i in PAPER_YIELDS:
            values["isomerization/paper_yield"] = PAPER_YIELDS[i]
        sink.write(values, i)
    for name, fig in figures.items():
        sink.figure(f"isomerization/{name}", fig, points[-1][0] if points else 0)
    sink.close()
    report = {
        "optimizer_steps": [i for i, _ in points],
        "yields_per_iteration": yields,
        "yields_source": source,
        "paper_yields": {str(k): v for k, v in PAPER_YIELDS.items()},
        **{f"{label}_{k}": v for label, d in summary.items() for k, v in d.items()},
        "vertical_excitation_yield": task.vertical_yield(),
        "wall_s": metrics.get("wall_s"),
    }
    atomic_write_json(run / "isomerization_report.json", report)
    return report


def _figure(n_rows: int = 1, height: float = 3.0) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, height * n_rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(n_rows, 1, squeeze=False)[:, 0]


def _plot_yields(points: list[tuple[int, float]]) -> Any:
    fig, (ax,) = _figure()
    ax.plot([i for i, _ in points], [y for _, y in points], "o-", ms=3, label="controlmd")
    ax.plot(
        list(PAPER_YIELDS),
        list(PAPER_YIELDS.values()),
        "s",
        color="black",
        label="paper (arXiv:2003.00868)",
    )
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("time-averaged yield")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _plot_curves(curves: dict[str, tuple[Tensor, Tensor]], task: Isomerization) -> Any:
    fig, (ax,) = _figure()
    for label, (t, y) in curves.items():
        ax.plot(t.numpy(), y.numpy(), lw=0.8, label=label)
    ax.axvspan(
        task.window_start / FS, task.t_end / FS, color="grey", alpha=0.12, label="averaging window"
    )
    ax.axvline(task.t_pulse / FS, color="grey", lw=0.6, ls="--")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("t [fs]")
    ax.set_ylabel("Y(t)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _plot_fields(t_fs: Tensor, fields: dict[str, tuple[Tensor, Tensor, Tensor]]) -> Any:
    fig, (top, bottom) = _figure(2)
    for label, (e, energies, power) in fields.items():
        top.plot(t_fs.numpy(), e.numpy(), lw=0.5, label=label)
        keep = energies < 6.0
        bottom.plot(energies[keep].numpy(), power[keep].numpy(), lw=0.8, label=label)
    top.set_xlabel("t [fs]")
    top.set_ylabel("E(t) [eV]")
    bottom.set_xlabel("photon energy [eV]")
    bottom.set_ylabel("|E(w)|^2 (normalized)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig

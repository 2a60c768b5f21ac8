"""Figures (matplotlib, Agg canvas: no display, no pyplot state): protocols, RDFs, pair
potentials, training histories. This module draws arrays it is given; it imports no
computation module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Tensor = torch.Tensor

__all__ = [
    "new_figure",
    "plot_pair_potentials",
    "plot_protocols",
    "plot_rdf_history",
    "plot_rdfs",
    "save_figure",
]

_STYLES = ("-", "--", ":", "-.")


def plot_protocols(
    tables: Mapping[str, tuple[Tensor, Tensor]],
    *,
    channel_names: Sequence[str] | None = None,
    units: Sequence[str] | None = None,
    time_unit: str = "",
    title: str = "",
) -> Figure:
    """One panel per control channel with each labelled table ``(t [n], u [n, k])``.

    Tables are drawn with markers when they have few points (jumps and boundary values).
    """
    first = next(iter(tables.values()))
    k = first[1].reshape(first[1].shape[0], -1).shape[1]
    fig = Figure(figsize=(6.0, 2.6 * k + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(k, 1, sharex=True, squeeze=False)[:, 0]
    for i, (label, (t, u)) in enumerate(tables.items()):
        t_np = t.detach().cpu().numpy()
        u_np = u.detach().reshape(u.shape[0], -1).cpu().numpy()
        for j, ax in enumerate(axes):
            marker = "o" if len(t_np) <= 12 else None
            ax.plot(t_np, u_np[:, j], _STYLES[i % len(_STYLES)], marker=marker, ms=3, label=label)
    for j, ax in enumerate(axes):
        name = channel_names[j] if channel_names else f"u{j}"
        unit = f" [{units[j]}]" if units and units[j] else ""
        ax.set_ylabel(f"{name}{unit}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    axes[-1].set_xlabel(f"t [{time_unit}]" if time_unit else "t")
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write a PNG atomically."""
    import io

    from controlmd.checkpoint import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def new_figure(width: float = 6.0, height: float = 3.6) -> Figure:
    """An empty figure on an Agg canvas (no display, no pyplot state)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_rdfs(r: Tensor, curves: dict[str, Tensor], *, title: str = "") -> Figure:
    """g(r) curves on the bin centres ``r``."""
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (label, g) in enumerate(curves.items()):
        ax.plot(
            r.numpy(),
            g.detach().to(torch.float64).numpy(),
            ("-", "--", ":", "-.")[i % 4],
            label=label,
        )
    ax.axhline(1.0, color="0.7", lw=0.8)
    ax.set_xlabel("r [sigma]")
    ax.set_ylabel("g(r) (smeared)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def plot_pair_potentials(r: Tensor, curves: dict[str, Tensor]) -> Figure:
    """u(r) curves, clipped to the interesting range."""
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (label, u) in enumerate(curves.items()):
        ax.plot(
            r.numpy(),
            u.detach().to(torch.float64).numpy(),
            ("-", ":", "--", "-.")[i % 4],
            label=label,
        )
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.set_ylim(-1.6, 2.0)
    ax.set_xlabel("r [sigma]")
    ax.set_ylabel("u(r) [epsilon]")
    ax.legend(fontsize="small")
    return fig


def plot_rdf_history(history: list[dict[str, float]]) -> Figure:
    """RDF error of each training rollout against the MD replica-steps spent."""
    fig = new_figure()
    ax = fig.add_subplot()
    if history:
        steps = [h["md_steps"] for h in history]
        ax.semilogy(
            steps,
            [max(h["rdf_mse"], 1e-12) for h in history],
            label="smeared RDF MSE (training batch)",
        )
    ax.set_xlabel("MD replica-steps")
    ax.set_ylabel("RDF MSE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return fig

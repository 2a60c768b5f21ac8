"""Protocol figures (matplotlib, Agg canvas: no display, no pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Tensor = torch.Tensor

__all__ = ["plot_protocols", "save_figure"]

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

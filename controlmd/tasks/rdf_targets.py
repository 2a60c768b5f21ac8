"""Target RDFs: the CSV file format, Gaussian smearing onto a task's bins, and the losses
between RDFs (reduced LJ units: r in sigma; g dimensionless).

File format (``save_rdf_csv`` / ``load_rdf_csv``): ``#`` comment lines ``# key: value``
(state point and provenance), a header ``r,g``, then one row per histogram bin centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from controlmd._validation import check_choice, check_positive
from controlmd.checkpoint import atomic_write_text
from controlmd.errors import ControlMDError
from controlmd.numerics import interp

Tensor = torch.Tensor

__all__ = ["LOSSES", "RDFTarget", "load_rdf_csv", "rdf_loss", "save_rdf_csv", "smear_rdf"]

LOSSES = ("mse", "js")
_CORE_G = 1e-2
"""Below ``r[0]`` of a target file, g is taken as 0 if ``g(r[0])`` is at most this."""


@dataclass(frozen=True)
class RDFTarget:
    """A target RDF on its own grid.

    Attributes:
        r: pair distances ``[M]`` (float64, sigma), strictly increasing.
        g: g(r) ``[M]`` (float64, dimensionless), >= 0.
        smearing_width: Gaussian width already applied to ``g`` (0: histogram RDF).
        meta: ``# key = value`` metadata of the file.
        source: where it came from (file path, or a description of the simulation).
    """

    r: Tensor
    g: Tensor
    smearing_width: float = 0.0
    meta: dict[str, str] = field(default_factory=dict)
    source: str = ""


def load_rdf_csv(path: str | Path) -> RDFTarget:
    """Read a target RDF in the CSV format of this module's docstring.

    :param path: the CSV file.
    :return: the target, float64 tensors.
    :raises ControlMDError: on a malformed file, naming the file, line and value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ControlMDError(f"cannot read RDF target file {str(path)!r}: {exc.strerror}") from exc
    meta: dict[str, str] = {}
    rows: list[tuple[float, float]] = []
    header_seen = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            key, sep, value = line[1:].partition("=")
            if sep and key.strip():
                meta[key.strip()] = value.strip()
            continue
        fields = [f.strip() for f in line.split(",")]
        where = f"{path}:{lineno}"
        if len(fields) != 2:
            raise ControlMDError(
                f"{where}: expected 2 comma-separated columns (r, g), got {len(fields)}: {line!r}"
            )
        try:
            r, g = float(fields[0]), float(fields[1])
        except ValueError:
            if rows or header_seen:
                raise ControlMDError(f"{where}: non-numeric data line {line!r}") from None
            header_seen = True
            continue
        if not (math.isfinite(r) and math.isfinite(g)):
            raise ControlMDError(f"{where}: r and g must be finite, got {line!r}")
        if r < 0:
            raise ControlMDError(f"{where}: r must be >= 0, got {r:g}")
        if g < 0:
            raise ControlMDError(
                f"{where}: g(r) must be >= 0 (an RDF is a density ratio), got {g:g}"
            )
        if rows and r <= rows[-1][0]:
            raise ControlMDError(
                f"{where}: r must be strictly increasing, got {r:g} after {rows[-1][0]:g}"
            )
        rows.append((r, g))
    if len(rows) < 3:
        raise ControlMDError(f"{path}: an RDF target needs at least 3 data rows, got {len(rows)}")
    try:
        width = float(meta.get("smearing_width", "0") or 0)
    except ValueError:
        width = math.nan
    if not (math.isfinite(width) and width >= 0):
        raise ControlMDError(f"{path}: smearing_width must be >= 0, got {meta['smearing_width']!r}")
    data = torch.tensor(rows, dtype=torch.float64)
    return RDFTarget(data[:, 0].contiguous(), data[:, 1].contiguous(), width, meta, str(path))


def save_rdf_csv(
    path: str | Path, r: Tensor, g: Tensor, *, meta: dict[str, object] | None = None
) -> None:
    """Write ``r [M]``, ``g [M]`` in the CSV format (atomically: temporary file + rename).

    :param path: destination.
    :param r: distances, strictly increasing (sigma).
    :param g: g(r) >= 0.
    :param meta: written as ``# key = value`` lines (e.g. density, kT, smearing_width).
    """
    path = Path(path)
    rs, gs = torch.as_tensor(r).flatten().tolist(), torch.as_tensor(g).flatten().tolist()
    if len(rs) != len(gs):
        raise ControlMDError(f"r and g must have the same length, got {len(rs)} and {len(gs)}")
    lines = ["# controlmd RDF target (format: controlmd/tasks/rdf_targets.py)"]
    lines += [f"# {k} = {v}" for k, v in (meta or {}).items()]
    lines.append("r,g")
    lines += [f"{ri:.6f},{gi:.6f}" for ri, gi in zip(rs, gs)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def smear_rdf(r: Tensor, g: Tensor, centers: Tensor, width: float, *, n_quad: int = 401) -> Tensor:
    """The Gaussian-smeared RDF that :func:`controlmd.observables.rdf` measures, on average,
    in a 3-D fluid whose exact RDF is ``g(r)``.

    ``observables.rdf`` divides the smeared pair count ``sum_ij G(r_k - r_ij)`` by its
    ideal-gas value; the pair density is ``rho N / 2 * 4 pi s^2 g(s)``, so its expectation
    is ``<g_s>(r_k) = int s^2 g(s) G(r_k - s) ds / int s^2 G(r_k - s) ds`` (over
    ``s >= 0``, ``|s - r_k| <= 4 width``), computed here by quadrature with ``g`` linearly
    interpolated between its points (left of ``r[0]``: 0 inside an empty core, else
    ``g(r[0])`` over at most half a bin).

    :param r: grid of the given RDF ``[M]`` (sigma), increasing (histogram bin centres).
    :param g: its values ``[M]``.
    :param centers: bin centres of the smeared RDF ``[K]``.
    :param width: Gaussian width (sigma, > 0).
    :param n_quad: quadrature points per centre.
    :return: smeared RDF ``[K]`` (float64).
    :raises ControlMDError: when ``r`` does not cover ``[r_1 - 4 width, r_K + 4 width]``.
    """
    check_positive("width", width)
    r = torch.as_tensor(r, dtype=torch.float64)
    g = torch.as_tensor(g, dtype=torch.float64)
    centers = torch.as_tensor(centers, dtype=torch.float64)
    reach = 4.0 * width
    spacing = float((r[1:] - r[:-1]).max())
    need_hi = float(centers[-1]) + reach
    if float(r[-1]) + 0.5 * spacing < need_hi - 1e-9:
        raise ControlMDError(
            f"the target RDF covers r <= {float(r[-1]):g}, but smearing it on bins up to "
            f"{float(centers[-1]):g} with width {width:g} needs g(r) up to {need_hi:g}; lower "
            "r_max (or the smearing) or give a longer target"
        )
    need_lo = max(float(centers[0]) - reach, 0.0)
    core = float(g[0]) <= _CORE_G
    if not core and float(r[0]) > need_lo + 0.5 * float(r[1] - r[0]) + 1e-9:
        raise ControlMDError(
            f"the target RDF starts at r = {float(r[0]):g} with g = {float(g[0]):g} > {_CORE_G:g}, "
            f"but the smeared RDF needs g(r) from {need_lo:g}; give the target down to its "
            "empty core (g = 0)"
        )
    u = torch.linspace(-reach, reach, n_quad, dtype=torch.float64)
    s = centers.unsqueeze(-1) + u
    kernel = torch.exp(-0.5 * (u / width) ** 2)
    weight = s.clamp(min=0.0) ** 2 * kernel
    gs = interp(s, r, g)  # constant below r[0] (half a histogram bin at most) ...
    if core:  # ... or zero inside an empty core
        gs = torch.where(s < r[0], torch.zeros_like(s), gs)
    return torch.trapezoid(weight * gs, u, dim=-1) / torch.trapezoid(weight, u, dim=-1)


def rdf_loss(g: Tensor, target: Tensor, *, kind: str = "mse", r: Tensor | None = None) -> Tensor:
    """Discrepancy of RDFs ``g [..., K]`` from ``target [K]`` -> ``[...]``.

    ``"mse"``: mean over bins of ``(g - target)^2``. ``"js"``: Jensen–Shannon divergence
    (nats) of the pair-distance distributions ``p_k ~ g_k r_k^2`` and ``q_k ~ target_k
    r_k^2`` (needs the bin centres ``r``).
    """
    check_choice("loss", kind, LOSSES)
    target = target.to(g)
    if kind == "mse":
        return ((g - target) ** 2).mean(dim=-1)
    if r is None:
        raise ControlMDError("the Jensen-Shannon RDF loss needs the bin centres r")
    w = r.to(g) ** 2
    p = g * w
    q = target * w
    p = p / p.sum(dim=-1, keepdim=True)
    q = q / q.sum(dim=-1, keepdim=True)
    m = (0.5 * (p + q)).clamp_min(1e-300)
    return 0.5 * (torch.xlogy(p, p / m).sum(dim=-1) + torch.xlogy(q, q / m).sum(dim=-1))

"""Target radial distribution functions: the CSV format, its loader and writer.

CSV format (``experiments/data/*.csv``)
---------------------------------------
UTF-8 text with two comma-separated columns, the pair distance ``r`` (in sigma, reduced LJ
units) and the radial distribution function ``g(r)`` (dimensionless)::

    # controlmd RDF target
    # density = 0.83
    # kT = 1.0
    # smearing_width = 0
    r,g
    0.0050,0.0
    0.0150,0.0
    ...

- Lines starting with ``#`` are comments; ``# key = value`` comments are kept as metadata
  (``density``, ``kT``, ``n_particles``, ``source``, ...). Blank lines are ignored.
- One optional header line of non-numeric fields (``r,g``) may precede the data.
- Every data line holds exactly two finite numbers; ``r`` is >= 0 and strictly increasing;
  ``g`` is >= 0. At least three rows.
- ``smearing_width``: 0 (or absent) means a histogram RDF (bin centres in ``r``), the
  usual output of MD codes and of experiments; a positive value says the file already holds
  an RDF Gaussian-smeared with that width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from controlmd.errors import ControlMDError

Tensor = torch.Tensor

__all__ = ["RDFTarget", "load_rdf_csv", "save_rdf_csv"]


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
            raise ControlMDError(f"{where}: g(r) must be >= 0 (an RDF is a density ratio), got {g:g}")
        if rows and r <= rows[-1][0]:
            raise ControlMDError(
                f"{where}: r must be strictly increasing, got {r:g} after {rows[-1][0]:g}"
            )
        rows.append((r, g))
    if len(rows) < 3:
        raise ControlMDError(f"{path}: an RDF target needs at least 3 data rows, got {len(rows)}")
    width = float(meta.get("smearing_width", "0") or 0)
    if not (math.isfinite(width) and width >= 0):
        raise ControlMDError(f"{path}: smearing_width must be >= 0, got {meta['smearing_width']!r}")
    data = torch.tensor(rows, dtype=torch.float64)
    return RDFTarget(data[:, 0], data[:, 1], width, meta, str(path))


def save_rdf_csv(path: str | Path, r: Tensor, g: Tensor, *, meta: dict[str, object] | None = None) -> None:
    """Write ``r [M]``, ``g [M]`` in the CSV format (atomically: temporary file + rename).

    :param path: destination.
    :param r: distances, strictly increasing (sigma).
    :param g: g(r) >= 0.
    :param meta: written as ``# key = value`` lines (e.g. density, kT, smearing_width).
    """
    path = Path(path)
    r, g = torch.as_tensor(r).flatten().tolist(), torch.as_tensor(g).flatten().tolist()
    if len(r) != len(g):
        raise ControlMDError(f"r and g must have the same length, got {len(r)} and {len(g)}")
    lines = ["# controlmd RDF target (format: controlmd/tasks/rdf_inverse.py)"]
    lines += [f"# {k} = {v}" for k, v in (meta or {}).items()]
    lines.append("r,g")
    lines += [f"{ri:.6f},{gi:.6f}" for ri, gi in zip(r, g)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)

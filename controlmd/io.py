"""Trajectory export to extended XYZ (readable by ASE, OVITO, VMD).

Units: positions in the task's length unit (sigma for reduced LJ tasks), written as they
are; say so in ``info`` (e.g. ``units="sigma"``) if a reader needs to know.

One frame is::

    N
    Lattice="Lx 0 0 0 Ly 0 0 0 Lz" Properties=species:S:1:pos:R:3[:name:R:k ...] pbc="T T T" [key=value ...]
    A x y z [extra columns]
    ...

Free space writes no ``Lattice`` and ``pbc="F F F"``. 2-D systems are padded with
``z = 0``; a periodic 2-D box is written with a unit third lattice vector and
``pbc="T T F"``. Files are written atomically (temporary file in the same directory,
then ``os.replace``), so a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from controlmd._validation import check_finite
from controlmd.errors import ControlMDError

Tensor = torch.Tensor

__all__ = ["write_xyz"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def write_xyz(
    path: str | os.PathLike[str],
    R: Tensor,
    *,
    box: Tensor | Sequence[float] | float | None = None,
    species: str | Sequence[str] | Tensor = "A",
    names: Sequence[str] | None = None,
    properties: Mapping[str, Tensor] | None = None,
    info: Mapping[str, float | int | str | Tensor | Sequence[float]] | None = None,
) -> Path:
    """Write frames to an extended XYZ file (overwriting it atomically).

    Args:
        path: output file.
        R: positions ``[N, d]`` (one frame) or ``[F, N, d]`` (F frames: the replicas of a
            batch, or the recorded times of one replica, ``records["R"][:, b]``); d = 2 or 3.
        box: periodic box sides (scalar or ``[d]``), or ``None`` for free space.
        species: one name for all particles, ``N`` names, or integer type ids ``[N]``
            (named by ``names``, default ``A, B, C, ...``).
        names: names of the integer type ids.
        properties: extra per-particle columns ``{name: [N], [N, k], [F, N] or [F, N, k]}``;
            floating tensors are written as reals (R), integer as I, bool as L.
        info: per-frame comment-line entries ``{key: scalar or [F] values}``, e.g.
            ``{"Time": times, "energy": E}``.

    Returns:
        The path written.
    """
    frames = _frames(R)
    F, N, d = frames.shape
    labels = _species(species, names, N)
    cols = _columns(properties or {}, F, N)
    header_info = _info(info or {}, F)
    lattice = _lattice(box, d)

    props = "species:S:1:pos:R:3" + "".join(
        f":{name}:{kind}:{width}" for name, (kind, width, _) in cols.items()
    )
    pos = torch.zeros(F, N, 3, dtype=torch.float64)
    pos[..., :d] = frames.detach().to("cpu", torch.float64)

    lines: list[str] = []
    for f in range(F):
        head = []
        if lattice is not None:
            head.append(f'Lattice="{lattice[0]}"')
        head.append(f"Properties={props}")
        head.append(f'pbc="{lattice[1] if lattice is not None else "F F F"}"')
        head.extend(f"{k}={_fmt_value(v[f])}" for k, v in header_info.items())
        lines.append(str(N))
        lines.append(" ".join(head))
        for i in range(N):
            row = [labels[i], *(_fmt(x) for x in pos[f, i].tolist())]
            for kind, width, values in cols.values():
                vals = values[f, i].reshape(-1).tolist()
                row.extend(_fmt_column(kind, v) for v in vals[:width])
            lines.append(" ".join(row))
    return _atomic_write(Path(path), "\n".join(lines) + "\n")


def _frames(R: Tensor) -> Tensor:
    if not isinstance(R, Tensor):
        raise ControlMDError(f"R must be a torch.Tensor, got {type(R)}")
    if R.ndim == 2:
        R = R.unsqueeze(0)
    if R.ndim != 3:
        hint = (
            "; for recorded trajectories [T, B, N, d] write one replica: R[:, b]"
            if R.ndim == 4
            else ""
        )
        raise ControlMDError(f"R must have shape [N, d] or [F, N, d], got {tuple(R.shape)}{hint}")
    if R.shape[-1] not in (2, 3):
        raise ControlMDError(f"R must have d = 2 or 3 spatial dimensions, got {R.shape[-1]}")
    if R.shape[1] == 0:
        raise ControlMDError("R has no particles")
    check_finite("R", R)
    return R


def _species(
    species: str | Sequence[str] | Tensor, names: Sequence[str] | None, N: int
) -> list[str]:
    if isinstance(species, str):
        labels = [species] * N
    elif isinstance(species, Tensor) and not species.is_floating_point():
        ids = species.reshape(-1).tolist()
        if len(ids) != N:
            raise ControlMDError(f"species has {len(ids)} entries for N = {N} particles")
        table = list(names) if names is not None else [chr(ord("A") + k) for k in range(26)]
        if ids and (min(ids) < 0 or max(ids) >= len(table)):
            raise ControlMDError(
                f"species ids must lie in [0, {len(table)}) (give names=), got {min(ids)}..{max(ids)}"
            )
        labels = [table[k] for k in ids]
    else:
        labels = [str(s) for s in species]
        if len(labels) != N:
            raise ControlMDError(f"species has {len(labels)} entries for N = {N} particles")
    for s in set(labels):
        if not s or any(c.isspace() for c in s) or '"' in s:
            raise ControlMDError(
                f"species names must be non-empty without spaces or quotes, got {s!r}"
            )
    return labels


def _columns(
    properties: Mapping[str, Tensor], F: int, N: int
) -> dict[str, tuple[str, int, Tensor]]:
    cols: dict[str, tuple[str, int, Tensor]] = {}
    for name, value in properties.items():
        if not _NAME.match(name) or name in ("species", "pos"):
            raise ControlMDError(
                f"property name {name!r} must be an identifier other than species/pos"
            )
        v = torch.as_tensor(value).detach().cpu()
        if v.shape[:1] == (N,) and v.ndim in (1, 2):
            v = v.unsqueeze(0).expand(F, *v.shape)
        if v.ndim == 2:
            v = v.unsqueeze(-1)
        if v.ndim != 3 or v.shape[:2] != (F, N):
            raise ControlMDError(
                f"property {name!r} must have shape [N], [N, k], [F, N] or [F, N, k] with F = {F}, "
                f"N = {N}, got {tuple(torch.as_tensor(value).shape)}"
            )
        if v.dtype == torch.bool:
            kind = "L"
        elif v.is_floating_point():
            kind = "R"
            check_finite(f"property {name!r}", v)
        else:
            kind = "I"
        cols[name] = (kind, v.shape[-1], v)
    return cols


def _info(info: Mapping[str, object], F: int) -> dict[str, list[object]]:
    out: dict[str, list[object]] = {}
    for key, value in info.items():
        if not _NAME.match(key) or key in ("Lattice", "Properties", "pbc"):
            raise ControlMDError(
                f"info key {key!r} must be an identifier other than Lattice/Properties/pbc"
            )
        if isinstance(value, str):
            out[key] = [value] * F
            continue
        t = torch.as_tensor(value).detach().cpu()
        if t.ndim == 0:
            out[key] = [t.item()] * F
        elif t.ndim == 1 and t.shape[0] == F:
            out[key] = t.tolist()
        else:
            raise ControlMDError(
                f"info {key!r} must be a scalar or have one value per frame ({F}), got shape {tuple(t.shape)}"
            )
    return out


def _lattice(box: Tensor | Sequence[float] | float | None, d: int) -> tuple[str, str] | None:
    if box is None:
        return None
    b = torch.as_tensor(box, dtype=torch.float64).reshape(-1)
    if b.numel() == 1:
        b = b.repeat(d)
    if b.numel() != d or not bool(torch.isfinite(b).all()) or bool((b <= 0).any()):
        raise ControlMDError(f"box must be {d} finite positive side lengths, got {b.tolist()}")
    sides = [*b.tolist(), 1.0] if d == 2 else b.tolist()
    m = [[0.0] * 3 for _ in range(3)]
    for a in range(3):
        m[a][a] = sides[a]
    return " ".join(_fmt(x) for row in m for x in row), ("T T F" if d == 2 else "T T T")


def _fmt(x: float) -> str:
    return f"{x:.10g}"


def _fmt_column(kind: str, v: object) -> str:
    if kind == "R":
        return _fmt(float(v))  # type: ignore[arg-type]
    if kind == "L":
        return "T" if v else "F"
    return str(int(v))  # type: ignore[call-overload]


def _fmt_value(v: object) -> str:
    if isinstance(v, bool):
        return "T" if v else "F"
    if isinstance(v, float):
        return _fmt(v)
    if isinstance(v, int):
        return str(v)
    s = str(v)
    return f'"{s}"' if (any(c.isspace() for c in s) or s == "") else s


def _atomic_write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; trajectories are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path

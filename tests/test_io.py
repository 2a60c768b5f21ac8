"""Extended XYZ export: header follows the extxyz spec; values round-trip through a parser
written here from the spec (ASE is not a dependency)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from controlmd import ControlMDError
from controlmd.io import write_xyz

F64 = torch.float64


def _parse_extxyz(text: str) -> list[dict]:
    """Minimal extended-XYZ reader: count line, key=value comment line, typed columns."""
    lines = text.splitlines()
    frames, k = [], 0
    while k < len(lines):
        n = int(lines[k])
        info = {}
        for tok in shlex.split(lines[k + 1]):
            key, _, value = tok.partition("=")
            info[key] = value
        fields = info["Properties"].split(":")
        props = [(fields[a], fields[a + 1], int(fields[a + 2])) for a in range(0, len(fields), 3)]
        cols: dict[str, list] = {name: [] for name, _, _ in props}
        for row in lines[k + 2 : k + 2 + n]:
            toks = row.split()
            assert len(toks) == sum(w for _, _, w in props)
            c = 0
            for name, kind, width in props:
                conv = {"S": str, "R": float, "I": int, "L": lambda s: s == "T"}[kind]
                vals = [conv(t) for t in toks[c : c + width]]
                cols[name].append(vals[0] if width == 1 else vals)
                c += width
        frames.append({"n": n, "info": info, "props": props, "cols": cols})
        k += 2 + n
    return frames


def test_round_trip_3d_periodic_trajectory(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    R = torch.rand(4, 5, 3, generator=g, dtype=F64) * 7.0  # 4 frames of 5 particles
    vel = torch.randn(4, 5, 3, generator=g, dtype=F64)
    charge = torch.tensor([1, -1, 0, 2, 1])
    bonded = torch.tensor([True, True, False, True, False])
    times = torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=F64)
    path = write_xyz(
        tmp_path / "sub" / "traj.xyz",
        R,
        box=[7.0, 8.0, 9.5],
        species=torch.tensor([0, 1, 1, 0, 2]),
        names=["Ar", "Kr", "Xe"],
        properties={"vel": vel, "charge": charge, "bonded": bonded},
        info={"Time": times, "units": "sigma", "step": 10},
    )
    frames = _parse_extxyz(path.read_text())
    assert len(frames) == 4
    for f, fr in enumerate(frames):
        assert fr["n"] == 5
        assert fr["info"]["Lattice"] == "7 0 0 0 8 0 0 0 9.5"
        assert fr["info"]["pbc"] == "T T T"
        assert fr["info"]["Properties"] == "species:S:1:pos:R:3:vel:R:3:charge:I:1:bonded:L:1"
        assert float(fr["info"]["Time"]) == float(times[f]) and fr["info"]["units"] == "sigma"
        assert fr["info"]["step"] == "10"
        assert fr["cols"]["species"] == ["Ar", "Kr", "Kr", "Ar", "Xe"]
        torch.testing.assert_close(
            torch.tensor(fr["cols"]["pos"], dtype=F64), R[f], rtol=1e-9, atol=1e-9
        )
        torch.testing.assert_close(
            torch.tensor(fr["cols"]["vel"], dtype=F64), vel[f], rtol=1e-9, atol=1e-9
        )
        assert fr["cols"]["charge"] == charge.tolist()
        assert fr["cols"]["bonded"] == bonded.tolist()
    # header line matches the extxyz grammar: key=value or key="quoted value" tokens only
    header = path.read_text().splitlines()[1]
    assert re.fullmatch(r'(\w+=("[^"]*"|\S+))( \w+=("[^"]*"|\S+))*', header), header
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_2d_free_space_single_frame_and_overwrite(tmp_path: Path) -> None:
    R = torch.tensor([[0.5, 1.5], [2.0, -3.25]], dtype=torch.float32)
    path = tmp_path / "one.xyz"
    path.write_text("old content\n")
    write_xyz(path, R)
    (fr,) = _parse_extxyz(path.read_text())
    assert "Lattice" not in fr["info"] and fr["info"]["pbc"] == "F F F"
    assert fr["cols"]["pos"] == [[0.5, 1.5, 0.0], [2.0, -3.25, 0.0]]
    assert fr["cols"]["species"] == ["A", "A"]
    # 2-D periodic: unit third lattice vector, not periodic along z
    write_xyz(path, R.unsqueeze(0), box=4.0, species=["P", "Q"])
    (fr,) = _parse_extxyz(path.read_text())
    assert fr["info"]["Lattice"] == "4 0 0 0 4 0 0 0 1" and fr["info"]["pbc"] == "T T F"
    assert fr["cols"]["species"] == ["P", "Q"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"R": torch.zeros(2, 3, 4, 3)}, r"write one replica: R\[:, b\]"),
        ({"R": torch.zeros(3, 4)}, "d = 2 or 3"),
        ({"R": torch.tensor([[0.0, float("nan"), 0.0]])}, "R must be finite"),
        ({"species": ["A", "B"]}, "species has 2 entries for N = 3"),
        ({"species": "A B"}, "without spaces"),
        ({"box": [1.0, -2.0, 3.0]}, "box must be 3 finite positive side lengths"),
        ({"properties": {"v": torch.zeros(4, 3)}}, r"property 'v' must have shape"),
        ({"properties": {"pos": torch.zeros(3)}}, "must be an identifier other than species/pos"),
        (
            {"info": {"E": torch.zeros(2)}},
            r"info 'E' must be a scalar or have one value per frame \(1\)",
        ),
    ],
)
def test_bad_xyz_input(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"R": torch.zeros(3, 3)} | kwargs
    R = args.pop("R")
    with pytest.raises(ControlMDError, match=match):
        write_xyz(tmp_path / "bad.xyz", R, **args)
    assert not (tmp_path / "bad.xyz").exists()

"""rdf_inverse: target files, RDF normalization, and learning a pair potential from an RDF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from controlmd.errors import ControlMDError
from controlmd.tasks.rdf_inverse import load_rdf_csv, save_rdf_csv


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "target.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_round_trip_with_metadata(tmp_path: Path) -> None:
    r = torch.linspace(0.0, 2.0, 11, dtype=torch.float64)
    g = torch.linspace(0.0, 1.5, 11, dtype=torch.float64)
    path = tmp_path / "sub" / "g.csv"
    save_rdf_csv(path, r, g, meta={"density": 0.83, "kT": 1.0})
    target = load_rdf_csv(path)
    torch.testing.assert_close(target.r, r)
    torch.testing.assert_close(target.g, g)
    assert target.meta["density"] == "0.83"
    assert target.smearing_width == 0.0
    assert target.source == str(path)


def test_csv_without_header_and_with_blank_lines(tmp_path: Path) -> None:
    target = load_rdf_csv(_write(tmp_path, "# smearing_width = 0.05\n0.1, 0\n\n0.2,0.5\n0.3,1.0\n"))
    assert target.g.tolist() == [0.0, 0.5, 1.0]
    assert target.smearing_width == 0.05


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("r,g\n0.1,0.0\n0.2,0.5,7\n0.3,1.0\n", r"target.csv:3: expected 2 comma-separated columns \(r, g\), got 3"),
        ("r\n0.1\n0.2\n0.3\n", "expected 2 comma-separated columns"),
        ("r,g\n0.1,0.0\n0.3,0.5\n0.2,1.0\n", "r must be strictly increasing, got 0.2 after 0.3"),
        ("r,g\n0.1,0.0\n0.1,0.5\n0.2,1.0\n", "strictly increasing"),
        ("r,g\n0.1,0.0\n0.2,-0.5\n0.3,1.0\n", r"g\(r\) must be >= 0 .*got -0.5"),
        ("r,g\n-0.1,0.0\n0.2,0.5\n0.3,1.0\n", "r must be >= 0"),
        ("r,g\n0.1,0.0\n0.2,nan\n0.3,1.0\n", "must be finite"),
        ("r,g\n0.1,0.0\n0.2,abc\n0.3,1.0\n", "non-numeric data line"),
        ("r,g\n0.1,0.0\n0.2,1.0\n", "at least 3 data rows, got 2"),
        ("# smearing_width = -1\n0.1,0.0\n0.2,1.0\n0.3,1.0\n", "smearing_width must be >= 0"),
    ],
)
def test_csv_loader_rejects_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ControlMDError, match=message):
        load_rdf_csv(_write(tmp_path, text))


def test_csv_loader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ControlMDError, match="cannot read RDF target file"):
        load_rdf_csv(tmp_path / "nope.csv")

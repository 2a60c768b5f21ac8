"""Every trajectory export reads back with ASE (positions, cell, pbc, per-atom columns)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from controlmd import NVE, HarmonicTrap, XYZReporter, periodic, simulate
from controlmd.protocols import make_protocol
from controlmd.tasks import get_task

ase_io = pytest.importorskip("ase.io")


def _final_replicas(name: str, tmp_path: Path, value: float, **params: object) -> Path:
    task = get_task(name, n_steps=10, **params)
    protocol = make_protocol(
        "piecewise_constant",
        dim=task.controls.dim,
        t_final=task.horizon,
        n_pieces=1,
        low=list(task.controls.low),
        high=list(task.controls.high),
        init=[value] * task.controls.dim,
    )
    task.integrator(protocol)  # the protocol finish_run rolls out
    summary = task.finish_run(tmp_path)
    assert "final_replicas.xyz" in summary["artifacts"]
    return tmp_path / "final_replicas.xyz"


def test_assembly_export_reads_with_ase(tmp_path: Path) -> None:
    path = _final_replicas("assembly", tmp_path, 6.0)
    frames = ase_io.read(path, index=":")
    assert len(frames) == 16
    atoms = frames[0]
    assert len(atoms) == 7 and set(atoms.get_chemical_symbols()) == {"X"}
    task = get_task("assembly", n_steps=10)
    side = float(torch.as_tensor(task.box).reshape(-1)[0])
    np.testing.assert_allclose(np.diag(atoms.cell.array)[:2], [side, side])
    assert list(atoms.pbc) == [True, True, False]
    assert np.all(atoms.positions[:, 2] == 0.0)  # 2-D disks at z = 0
    assert "coordination" in atoms.arrays and atoms.arrays["coordination"].dtype.kind == "i"
    assert {"replica", "yield", "bonds"} <= set(atoms.info)


def test_polymer_export_reads_with_ase(tmp_path: Path) -> None:
    path = _final_replicas("polymer_fold", tmp_path, 0.5)
    frames = ase_io.read(path, index=":")
    assert len(frames) == 16
    atoms = frames[0]
    assert len(atoms) == 22 and set(atoms.get_chemical_symbols()) == {"C"}
    assert not any(atoms.pbc)
    bonds = np.linalg.norm(np.diff(atoms.positions, axis=0), axis=1)
    assert np.all((bonds > 0.5) & (bonds < 1.6))  # a connected chain, in units of sigma
    assert {"folded", "Q"} <= set(atoms.info)


def test_xyz_reporter_reads_with_ase(tmp_path: Path) -> None:
    space = periodic(torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64))
    integrator = NVE(HarmonicTrap(stiffness=1.0, center=2.5), dt=0.01, space=space)
    R = torch.rand(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    state = integrator.init(R, P=torch.zeros_like(R))
    path = tmp_path / "traj.xyz"
    reporter = XYZReporter(path, 5, replica=1)
    final = simulate(integrator, state, 10, gradient="none", reporters=[reporter]).final
    reporter.close()
    frames = ase_io.read(path, index=":")
    assert len(frames) == 2
    np.testing.assert_allclose(frames[-1].positions, final.R[1].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.diag(frames[-1].cell.array), [5.0, 6.0, 7.0])
    assert all(frames[-1].pbc)

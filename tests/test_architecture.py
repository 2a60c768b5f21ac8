"""The package's shape: light imports, a public API that resolves, declared layers."""

from __future__ import annotations

import subprocess
import sys

import pytest

import controlmd


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


@pytest.mark.parametrize("statement", ["import controlmd.space", "import controlmd"])
def test_importing_the_core_loads_no_trainer_cli_or_plotting(statement: str) -> None:
    loaded = _loaded_after(statement)
    heavy = {
        "controlmd.trainer",
        "controlmd.cli",
        "controlmd.experiment",
        "tensorboard",
        "matplotlib",
        "gymnasium",
        "stable_baselines3",
        "ray",
    }
    assert not heavy & loaded, sorted(heavy & loaded)


def test_every_public_name_resolves() -> None:
    for name in controlmd.__all__:
        assert getattr(controlmd, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = controlmd.nope  # type: ignore[attr-defined]


def test_public_functions_survive_the_import_of_their_namesake_submodules() -> None:
    import controlmd.lattice
    import controlmd.simulate
    from controlmd import lattice, simulate

    assert callable(simulate) and callable(lattice)
    assert controlmd.simulate is simulate and controlmd.lattice is lattice
    assert sys.modules["controlmd.simulate"].simulate is simulate


def test_moved_code_keeps_its_import_paths() -> None:
    from controlmd.config import load_config  # noqa: F401
    from controlmd.protocols import PiecewiseConstant, make_protocol  # noqa: F401
    from controlmd.sweep import Job, ray_available, run_jobs  # noqa: F401
    from controlmd.train import (  # noqa: F401
        EVAL_SEED_OFFSET,
        FINAL_SEED_OFFSET,
        Evaluation,
        Trainer,
        evaluate,
        run_experiment,
    )


def test_the_cli_lists_its_declared_subcommands() -> None:
    from controlmd.cli import COMMANDS, build_parser

    text = build_parser().format_help()
    for name in COMMANDS:
        assert name in text

"""Pair potentials by family name, and their files: what ``[task] potential`` of the
``rdf_inverse`` task and IBI's tables are built from (reduced LJ units)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from controlmd._validation import check_choice
from controlmd.checkpoint import atomic_torch_save
from controlmd.errors import ControlMDError
from controlmd.potentials.neural import NeuralPair
from controlmd.potentials.pair import LennardJones, Morse, PairPotential, SoftSphere
from controlmd.potentials.tabulated import TabulatedPair
from controlmd.space import Space

Tensor = torch.Tensor

__all__ = [
    "PAIR_FAMILIES",
    "PAIR_FILE_FORMAT",
    "load_pair_potential",
    "make_pair_potential",
    "save_pair_potential",
]

PAIR_FAMILIES: dict[str, tuple[str, ...]] = {
    "lj": ("epsilon", "sigma"),
    "morse": ("epsilon", "sigma", "alpha"),
    "soft_sphere": ("epsilon", "sigma", "alpha"),
    "neural": (),
    "tabulated": (),
}
"""Pair families a task can learn, with their scalar parameters (reported in metrics.json)."""


def make_pair_potential(
    kind: str,
    space: Space,
    *,
    params: dict[str, Any] | None = None,
    learn: Sequence[str] | bool = False,
    r_cut: float = 2.5,
    shift: str = "energy",
) -> PairPotential:
    """A pair term of family ``kind`` (see :data:`PAIR_FAMILIES`) in ``space``.

    :param kind: ``lj``, ``morse``, ``soft_sphere``, ``neural`` or ``tabulated``.
    :param params: constructor values: scalar parameters of the parametric families
        (``epsilon``, ``sigma``, ``alpha``); :class:`~controlmd.potentials.neural.NeuralPair`
        arguments for ``neural``; ``r``, ``u`` (and ``interpolation``) for ``tabulated``.
    :param learn: names of the parameters to learn (``True``: all; the neural family's MLP
        is always learnable, ``learn_prior`` in ``params`` adds its prior).
    :param r_cut: cutoff (sigma); soft spheres and tables carry their own.
    :param shift: cutoff treatment of ``lj`` and ``morse``.
    """
    check_choice("potential", kind, list(PAIR_FAMILIES))
    params = dict(params or {})
    names = PAIR_FAMILIES[kind]
    if names:
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ControlMDError(
                f"unknown parameter(s) {unknown} for potential {kind!r}; expected: {', '.join(names)}"
            )
        learnable: bool | list[str] = learn if isinstance(learn, bool) else list(learn)
        if not isinstance(learnable, bool):
            bad = sorted(set(learnable) - set(names))
            if bad:
                raise ControlMDError(
                    f"learn names {bad}, which potential {kind!r} does not have; expected: {', '.join(names)}"
                )
        if kind == "lj":
            return LennardJones(space, r_cut=r_cut, shift=shift, learnable=learnable, **params)
        if kind == "morse":
            return Morse(space, r_cut=r_cut, shift=shift, learnable=learnable, **params)
        return SoftSphere(space, learnable=learnable, **params)
    if kind == "neural":
        return NeuralPair(space, r_cut=r_cut, **params)
    if "r" not in params or "u" not in params:
        raise ControlMDError(
            "a tabulated potential needs params with the grid 'r' and the values 'u'"
        )
    return TabulatedPair(space, learnable=bool(learn), **params)


PAIR_FILE_FORMAT = "controlmd.pair_potential/1"


def save_pair_potential(path: str | Path, pair: PairPotential, spec: dict[str, Any]) -> None:
    """Write a pair term with its rebuild recipe ``spec`` (see :func:`make_pair_potential`)
    and its parameter values, atomically."""
    atomic_torch_save(
        {"format": PAIR_FILE_FORMAT, "spec": _plain(spec), "state_dict": pair.state_dict()}, path
    )


def load_pair_potential(path: str | Path, space: Space) -> PairPotential:
    """Rebuild a pair term written by :func:`save_pair_potential` in ``space`` (e.g. a box
    at another density, for transfer checks)."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != PAIR_FILE_FORMAT:
        raise ControlMDError(
            f"{path} is not a controlmd pair-potential file (format {PAIR_FILE_FORMAT})"
        )
    spec = dict(blob["spec"])
    pair = make_pair_potential(
        spec["potential"],
        space,
        params=spec.get("params"),
        learn=spec.get("learn", False),
        r_cut=spec.get("r_cut", 2.5),
        shift=spec.get("shift", "energy"),
    )
    pair.load_state_dict(blob["state_dict"])
    return pair


def _plain(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().tolist()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj

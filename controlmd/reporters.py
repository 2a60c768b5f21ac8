"""Per-step observers in OpenMM's reporter pattern; :func:`~controlmd.simulate.simulate`
holds no I/O.

A reporter says how many steps remain until it next needs the state
(:meth:`Reporter.describe_next_report`) and then receives it (:meth:`Reporter.report`,
called with a detached state under ``torch.no_grad``). ``simulate`` ends a segment of
steps exactly there, so reports never miss a step.

Units in the output are the task's (reduced LJ units for classical tasks: time in tau,
energy in epsilon, temperature as kT in epsilon).
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import torch

from controlmd._validation import check_choice, check_int
from controlmd.dynamics.base import Integrator, State, kinetic_energy
from controlmd.errors import ControlMDError

Tensor = torch.Tensor

__all__ = [
    "CallbackReporter",
    "IntervalReporter",
    "MemoryReporter",
    "Reporter",
    "StateDataReporter",
    "XYZReporter",
    "state_quantities",
]

QUANTITIES = (
    "potential_energy",
    "kinetic_energy",
    "total_energy",
    "temperature",
    "invariant",
    "work",
)
_UNITS = {
    "step": "",
    "time": "tau",
    "potential_energy": "epsilon",
    "kinetic_energy": "epsilon",
    "total_energy": "epsilon",
    "temperature": "kT, epsilon",
    "invariant": "epsilon",
    "work": "epsilon",
}


class Reporter(ABC):
    """Base class of reporters."""

    @abstractmethod
    def describe_next_report(self, state: State) -> int:
        """Steps (>= 1) from ``state`` until this reporter next wants the state."""

    @abstractmethod
    def report(self, state: State, integrator: Integrator) -> None:
        """Receive the (detached) state."""

    def close(self) -> None:  # noqa: B027  (optional hook, empty by default)
        """Release files; called by the owner when the run ends."""


class IntervalReporter(Reporter):
    """A reporter that wants the state whenever ``state.step`` is a multiple of ``every``."""

    def __init__(self, every: int) -> None:
        check_int("every", every)
        self.every = every

    def describe_next_report(self, state: State) -> int:
        return self.every - state.step % self.every


class CallbackReporter(IntervalReporter):
    """Calls ``fn(state, integrator)`` every ``every`` steps."""

    def __init__(self, every: int, fn: Callable[[State, Integrator], None]) -> None:
        super().__init__(every)
        self.fn = fn

    def report(self, state: State, integrator: Integrator) -> None:
        self.fn(state, integrator)


def state_quantities(
    state: State, integrator: Integrator, names: Sequence[str] = QUANTITIES
) -> dict[str, Tensor]:
    """Per-replica ``[B]`` values of the named quantities that apply to this integrator.

    ``kinetic_energy``, ``total_energy`` and ``temperature`` need momenta; ``temperature``
    is ``2 KE / n_dof`` with the integrator's degrees-of-freedom rule; ``invariant`` needs
    an integrator with ``invariant``; ``work`` needs ``state.aux["work"]``. Quantities that
    do not apply are left out.
    """
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        U = integrator.potential_energy(state)
        if "potential_energy" in names:
            out["potential_energy"] = U
        if state.P is not None:
            K = kinetic_energy(state.P, integrator.mass_like(state.R))
            if "kinetic_energy" in names:
                out["kinetic_energy"] = K
            if "total_energy" in names:
                out["total_energy"] = K + U
            if "temperature" in names and hasattr(integrator, "n_dof"):
                out["temperature"] = 2.0 * K / integrator.n_dof(state.R)  # type: ignore[operator]
        if "invariant" in names and hasattr(integrator, "invariant"):
            out["invariant"] = integrator.invariant(state)  # type: ignore[operator]
        if "work" in names and "work" in state.aux:
            out["work"] = state.aux["work"]
    return out


class MemoryReporter(IntervalReporter):
    """Keeps per-replica quantities in memory: ``data[name]`` is a list of ``[B]`` tensors,
    ``steps`` and ``times`` the matching step indices and times.

    Args:
        every: report interval in steps.
        quantities: names from :data:`QUANTITIES` (those that do not apply are skipped).
    """

    def __init__(self, every: int, quantities: Sequence[str] = QUANTITIES) -> None:
        super().__init__(every)
        for q in quantities:
            check_choice("quantity", q, QUANTITIES)
        self.quantities = tuple(quantities)
        self.steps: list[int] = []
        self.times: list[float] = []
        self.data: dict[str, list[Tensor]] = {}

    def report(self, state: State, integrator: Integrator) -> None:
        self.steps.append(state.step)
        self.times.append(float(state.t))
        for name, value in state_quantities(state, integrator, self.quantities).items():
            self.data.setdefault(name, []).append(value.detach().clone())

    def stacked(self, name: str) -> Tensor:
        """``[n_reports, B]`` values of ``name``."""
        if name not in self.data:
            raise ControlMDError(
                f"no data for {name!r}; recorded: {', '.join(self.data) or 'none'}"
            )
        return torch.stack(self.data[name])


class StateDataReporter(IntervalReporter):
    """Writes replica-averaged quantities as CSV lines (OpenMM's StateDataReporter).

    The header names each column with its unit, e.g. ``time (tau)``.

    Args:
        file: a path (opened for writing on the first report) or a text stream.
        every: report interval in steps.
        quantities: names from :data:`QUANTITIES`; those that do not apply are skipped.
    """

    def __init__(
        self,
        file: str | os.PathLike | IO[str],
        every: int,
        quantities: Sequence[str] = (
            "potential_energy",
            "kinetic_energy",
            "total_energy",
            "temperature",
        ),
    ) -> None:
        super().__init__(every)
        for q in quantities:
            check_choice("quantity", q, QUANTITIES)
        self.quantities = tuple(quantities)
        self._path = (
            None if isinstance(file, io.TextIOBase) or hasattr(file, "write") else Path(file)
        )  # type: ignore[arg-type]
        self._stream: IO[str] | None = None if self._path is not None else file  # type: ignore[assignment]
        self._columns: list[str] | None = None

    def report(self, state: State, integrator: Integrator) -> None:
        values = state_quantities(state, integrator, self.quantities)
        if self._stream is None:
            assert self._path is not None
            self._stream = open(self._path, "w")  # closed in close()
        if self._columns is None:
            self._columns = [q for q in self.quantities if q in values]
            header = ["step", "time", *self._columns]
            self._stream.write(
                ",".join(f"{h} ({_UNITS[h]})" if _UNITS[h] else h for h in header) + "\n"
            )
        row = [str(state.step), f"{float(state.t):.6g}"]
        row += [f"{float(values[c].mean()):.10g}" for c in self._columns]
        self._stream.write(",".join(row) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._path is not None and self._stream is not None:
            self._stream.close()
            self._stream = None


class XYZReporter(IntervalReporter):
    """Appends frames of one replica to an extended-XYZ file (read by ASE, OVITO, VMD).

    Each frame: the particle count, a comment line with ``Lattice`` (periodic boxes),
    ``Properties=species:S:1:pos:R:3[:momenta:R:3]``, ``Time`` and ``pbc``, then one line
    per particle. 2-D systems are written with z = 0.

    Args:
        path: output file (overwritten on the first report).
        every: report interval in steps.
        replica: which replica to write.
        species: one symbol for all particles, or one per particle.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        every: int,
        *,
        replica: int = 0,
        species: str | Sequence[str] = "X",
    ) -> None:
        super().__init__(every)
        check_int("replica", replica, minimum=0)
        self.path = Path(path)
        self.replica = replica
        self.species = species
        self._stream: IO[str] | None = None

    def report(self, state: State, integrator: Integrator) -> None:
        if self.replica >= state.n_replicas:
            raise ControlMDError(
                f"replica = {self.replica} but the state has B = {state.n_replicas}"
            )
        if self._stream is None:
            self._stream = open(self.path, "w")  # closed in close()
        R = _pad3(state.R[self.replica])
        N = R.shape[0]
        species = [self.species] * N if isinstance(self.species, str) else list(self.species)
        if len(species) != N:
            raise ControlMDError(f"species has {len(species)} entries for N = {N} particles")
        props = "species:S:1:pos:R:3"
        P = None
        if state.P is not None:
            props += ":momenta:R:3"
            P = _pad3(state.P[self.replica])
        box = integrator.space.box
        comment = f"Properties={props} Time={float(state.t):.10g} Step={state.step}"
        if box is not None:
            L = [float(x) for x in box] + [0.0] * (3 - box.shape[0])
            L = [x if x > 0 else 1.0 for x in L]
            lattice = f"{L[0]} 0 0 0 {L[1]} 0 0 0 {L[2]}"
            pbc = " ".join("T" if i < box.shape[0] else "F" for i in range(3))
            comment = f'Lattice="{lattice}" {comment} pbc="{pbc}"'
        lines = [str(N), comment]
        for i in range(N):
            row = [species[i]] + [f"{float(x):.10g}" for x in R[i]]
            if P is not None:
                row += [f"{float(x):.10g}" for x in P[i]]
            lines.append(" ".join(row))
        self._stream.write("\n".join(lines) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _pad3(x: Tensor) -> Tensor:
    """``[N, d]`` -> ``[N, 3]`` with zero padding (d <= 3)."""
    x = x.detach().to(torch.float64).cpu()
    if x.shape[-1] > 3:
        raise ControlMDError(f"extended XYZ holds at most 3 dimensions, got d = {x.shape[-1]}")
    return torch.nn.functional.pad(x, (0, 3 - x.shape[-1]))

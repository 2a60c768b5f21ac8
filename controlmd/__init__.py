"""controlmd: differentiable molecular simulation for control and learning.

The public API: spaces, potentials, integrators, ``simulate``, observables, protocols,
tasks and the trainer. Everything else lives in submodules and may change.

Names are imported lazily (PEP 562): ``import controlmd.space`` or ``import controlmd``
loads no trainer, CLI, TensorBoard or matplotlib; ``controlmd.Trainer`` imports the
trainer on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Callback": "controlmd.callbacks",
    "CheckpointCallback": "controlmd.callbacks",
    "EarlyStopping": "controlmd.callbacks",
    "EvalCallback": "controlmd.callbacks",
    "load_config": "controlmd.config",
    "Brownian": "controlmd.dynamics",
    "ControlSchedule": "controlmd.dynamics",
    "FusedSteps": "controlmd.dynamics",
    "Integrator": "controlmd.dynamics",
    "IntegratorWrapper": "controlmd.dynamics",
    "Langevin": "controlmd.dynamics",
    "NVE": "controlmd.dynamics",
    "NoseHooverChain": "controlmd.dynamics",
    "State": "controlmd.dynamics",
    "use_fused_steps": "controlmd.dynamics",
    "ConfigError": "controlmd.errors",
    "ControlMDError": "controlmd.errors",
    "SimulationDivergedError": "controlmd.errors",
    "PairedEvaluation": "controlmd.evaluation",
    "evaluate": "controlmd.evaluation",
    "evaluate_paired": "controlmd.evaluation",
    "mean_se": "controlmd.evaluation",
    "pareto_front": "controlmd.evaluation",
    "run_experiment": "controlmd.experiment",
    "write_xyz": "controlmd.io",
    "lattice": "controlmd.lattice",
    "NeighborList": "controlmd.neighbors",
    "degrees_of_freedom": "controlmd.observables",
    "end_to_end_distance": "controlmd.observables",
    "kinetic_energy": "controlmd.observables",
    "native_contact_fraction": "controlmd.observables",
    "native_contacts": "controlmd.observables",
    "pressure": "controlmd.observables",
    "radius_of_gyration": "controlmd.observables",
    "rdf": "controlmd.observables",
    "rdf_histogram": "controlmd.observables",
    "temperature": "controlmd.observables",
    "BasisField": "controlmd.potentials",
    "Confinement": "controlmd.potentials",
    "ConstantForce": "controlmd.potentials",
    "FieldNetwork": "controlmd.potentials",
    "NeuralField": "controlmd.potentials",
    "RadialWave": "controlmd.potentials",
    "mean_square_force": "controlmd.potentials",
    "CosineDihedral": "controlmd.potentials",
    "ExternalField": "controlmd.potentials",
    "FENEBond": "controlmd.potentials",
    "HarmonicAngle": "controlmd.potentials",
    "HarmonicBond": "controlmd.potentials",
    "HarmonicTrap": "controlmd.potentials",
    "LennardJones": "controlmd.potentials",
    "Morse": "controlmd.potentials",
    "NeuralPair": "controlmd.potentials",
    "Potential": "controlmd.potentials",
    "ScaledPotential": "controlmd.potentials",
    "SoftSphere": "controlmd.potentials",
    "SumPotential": "controlmd.potentials",
    "TabulatedPair": "controlmd.potentials",
    "WCA": "controlmd.potentials",
    "energy_and_forces": "controlmd.potentials",
    "validate_configuration": "controlmd.potentials",
    "ChebyshevSeries": "controlmd.protocols",
    "CubicSpline": "controlmd.protocols",
    "FeedbackMLP": "controlmd.protocols",
    "FourierSeries": "controlmd.protocols",
    "HeldControl": "controlmd.protocols",
    "Endpoints": "controlmd.protocols",
    "MLPProtocol": "controlmd.protocols",
    "NeuralFieldProtocol": "controlmd.protocols",
    "PiecewiseConstant": "controlmd.protocols",
    "Protocol": "controlmd.protocols",
    "Tabulated": "controlmd.protocols",
    "load_protocol": "controlmd.protocols",
    "make_protocol": "controlmd.protocols",
    "protocol_names": "controlmd.protocols",
    "register_protocol": "controlmd.protocols",
    "IntervalReporter": "controlmd.reporters",
    "MemoryReporter": "controlmd.reporters",
    "StateDataReporter": "controlmd.reporters",
    "XYZReporter": "controlmd.reporters",
    "ReplicaRNG": "controlmd.rng",
    "replica_seed": "controlmd.rng",
    "use_rng": "controlmd.rng",
    "Trajectory": "controlmd.simulate",
    "simulate": "controlmd.simulate",
    "simulate_ode": "controlmd.simulate",
    "Space": "controlmd.space",
    "free": "controlmd.space",
    "periodic": "controlmd.space",
    "ControlChannels": "controlmd.tasks",
    "Task": "controlmd.tasks",
    "get_task": "controlmd.tasks",
    "register_task": "controlmd.tasks",
    "task_names": "controlmd.tasks",
    "Trainer": "controlmd.trainer",
}
"""Public name -> the module that defines it."""

__all__ = [
    "NVE",
    "WCA",
    "BasisField",
    "Brownian",
    "Callback",
    "ChebyshevSeries",
    "CheckpointCallback",
    "ConfigError",
    "Confinement",
    "ConstantForce",
    "ControlChannels",
    "ControlMDError",
    "ControlSchedule",
    "CosineDihedral",
    "CubicSpline",
    "EarlyStopping",
    "Endpoints",
    "EvalCallback",
    "ExternalField",
    "FENEBond",
    "FeedbackMLP",
    "FieldNetwork",
    "FourierSeries",
    "FusedSteps",
    "HarmonicAngle",
    "HarmonicBond",
    "HarmonicTrap",
    "HeldControl",
    "Integrator",
    "IntegratorWrapper",
    "IntervalReporter",
    "Langevin",
    "LennardJones",
    "MLPProtocol",
    "MemoryReporter",
    "Morse",
    "NeighborList",
    "NeuralField",
    "NeuralFieldProtocol",
    "NeuralPair",
    "NoseHooverChain",
    "PairedEvaluation",
    "PiecewiseConstant",
    "Potential",
    "Protocol",
    "RadialWave",
    "ReplicaRNG",
    "ScaledPotential",
    "SimulationDivergedError",
    "SoftSphere",
    "Space",
    "State",
    "StateDataReporter",
    "SumPotential",
    "Tabulated",
    "TabulatedPair",
    "Task",
    "Trainer",
    "Trajectory",
    "XYZReporter",
    "degrees_of_freedom",
    "end_to_end_distance",
    "energy_and_forces",
    "evaluate",
    "evaluate_paired",
    "free",
    "get_task",
    "kinetic_energy",
    "lattice",
    "load_config",
    "load_protocol",
    "make_protocol",
    "mean_se",
    "mean_square_force",
    "native_contact_fraction",
    "native_contacts",
    "pareto_front",
    "periodic",
    "pressure",
    "protocol_names",
    "radius_of_gyration",
    "rdf",
    "rdf_histogram",
    "register_protocol",
    "register_task",
    "replica_seed",
    "run_experiment",
    "simulate",
    "simulate_ode",
    "task_names",
    "temperature",
    "use_fused_steps",
    "use_rng",
    "validate_configuration",
    "write_xyz",
]


class _PublicNames(types.ModuleType):
    """Keeps a public function bound to its name when its namesake submodule is imported.

    ``controlmd.simulate`` and ``controlmd.lattice`` are both a function and a submodule;
    the import system binds a submodule to its parent on import, which would shadow the
    function for every later ``from controlmd import simulate``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PublicNames


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'controlmd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from controlmd.callbacks import Callback, CheckpointCallback, EarlyStopping, EvalCallback
    from controlmd.config import load_config
    from controlmd.dynamics import (
        NVE,
        Brownian,
        ControlSchedule,
        FusedSteps,
        Integrator,
        IntegratorWrapper,
        Langevin,
        NoseHooverChain,
        State,
        use_fused_steps,
    )
    from controlmd.errors import ConfigError, ControlMDError, SimulationDivergedError
    from controlmd.evaluation import (
        PairedEvaluation,
        evaluate,
        evaluate_paired,
        mean_se,
        pareto_front,
    )
    from controlmd.experiment import run_experiment
    from controlmd.io import write_xyz
    from controlmd.lattice import lattice
    from controlmd.neighbors import NeighborList
    from controlmd.observables import (
        degrees_of_freedom,
        end_to_end_distance,
        kinetic_energy,
        native_contact_fraction,
        native_contacts,
        pressure,
        radius_of_gyration,
        rdf,
        rdf_histogram,
        temperature,
    )
    from controlmd.potentials import (
        WCA,
        BasisField,
        Confinement,
        ConstantForce,
        CosineDihedral,
        ExternalField,
        FENEBond,
        FieldNetwork,
        HarmonicAngle,
        HarmonicBond,
        HarmonicTrap,
        LennardJones,
        Morse,
        NeuralField,
        NeuralPair,
        Potential,
        RadialWave,
        ScaledPotential,
        SoftSphere,
        SumPotential,
        TabulatedPair,
        energy_and_forces,
        mean_square_force,
        validate_configuration,
    )
    from controlmd.protocols import (
        ChebyshevSeries,
        CubicSpline,
        Endpoints,
        FeedbackMLP,
        FourierSeries,
        HeldControl,
        MLPProtocol,
        NeuralFieldProtocol,
        PiecewiseConstant,
        Protocol,
        Tabulated,
        load_protocol,
        make_protocol,
        protocol_names,
        register_protocol,
    )
    from controlmd.reporters import IntervalReporter, MemoryReporter, StateDataReporter, XYZReporter
    from controlmd.rng import ReplicaRNG, replica_seed, use_rng
    from controlmd.simulate import Trajectory, simulate, simulate_ode
    from controlmd.space import Space, free, periodic
    from controlmd.tasks import ControlChannels, Task, get_task, register_task, task_names
    from controlmd.trainer import Trainer

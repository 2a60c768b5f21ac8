"""controlmd: differentiable molecular simulation for control and learning.

The public API: spaces, potentials, integrators, ``simulate``, observables, protocols,
tasks and the trainer. Everything else lives in submodules and may change.
"""

from controlmd.dynamics import (
    NVE,
    Brownian,
    ControlSchedule,
    Integrator,
    Langevin,
    NoseHooverChain,
    State,
)
from controlmd.errors import ConfigError, ControlMDError, SimulationDivergedError
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
    ConstantForce,
    CosineDihedral,
    ExternalField,
    FENEBond,
    HarmonicAngle,
    HarmonicBond,
    HarmonicTrap,
    LennardJones,
    Morse,
    NeuralPair,
    Potential,
    ScaledPotential,
    SoftSphere,
    SumPotential,
    TabulatedPair,
    energy_and_forces,
    validate_configuration,
)
from controlmd.protocols import HeldControl, PiecewiseConstant, Protocol
from controlmd.rng import ReplicaRNG, replica_seed
from controlmd.simulate import Trajectory, simulate, simulate_ode
from controlmd.space import Space, free, periodic
from controlmd.tasks import ControlChannels, Task, get_task, register_task, task_names

__version__ = "0.1.0"

__all__ = [
    "NVE",
    "WCA",
    "Brownian",
    "ConfigError",
    "ConstantForce",
    "ControlChannels",
    "ControlMDError",
    "ControlSchedule",
    "CosineDihedral",
    "ExternalField",
    "FENEBond",
    "HarmonicAngle",
    "HarmonicBond",
    "HarmonicTrap",
    "HeldControl",
    "Integrator",
    "Langevin",
    "LennardJones",
    "Morse",
    "NeighborList",
    "NeuralPair",
    "NoseHooverChain",
    "PiecewiseConstant",
    "Potential",
    "Protocol",
    "ReplicaRNG",
    "ScaledPotential",
    "SimulationDivergedError",
    "SoftSphere",
    "Space",
    "State",
    "SumPotential",
    "TabulatedPair",
    "Task",
    "Trajectory",
    "degrees_of_freedom",
    "end_to_end_distance",
    "energy_and_forces",
    "free",
    "get_task",
    "kinetic_energy",
    "lattice",
    "native_contact_fraction",
    "native_contacts",
    "periodic",
    "pressure",
    "radius_of_gyration",
    "rdf",
    "rdf_histogram",
    "register_task",
    "replica_seed",
    "simulate",
    "simulate_ode",
    "task_names",
    "temperature",
    "validate_configuration",
    "write_xyz",
]

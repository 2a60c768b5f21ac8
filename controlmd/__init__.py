"""controlmd: differentiable molecular simulation for control and learning."""

from controlmd.dynamics import Integrator, State
from controlmd.errors import ConfigError, ControlMDError, SimulationDivergedError
from controlmd.potentials import Potential, SumPotential, energy_and_forces
from controlmd.protocols import HeldControl, PiecewiseConstant, Protocol
from controlmd.rng import ReplicaRNG, replica_seed
from controlmd.space import Space, free, periodic
from controlmd.tasks import ControlChannels, Task, get_task, register_task, task_names

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ControlChannels",
    "ControlMDError",
    "HeldControl",
    "Integrator",
    "PiecewiseConstant",
    "Potential",
    "Protocol",
    "ReplicaRNG",
    "SimulationDivergedError",
    "Space",
    "State",
    "SumPotential",
    "Task",
    "energy_and_forces",
    "free",
    "get_task",
    "periodic",
    "register_task",
    "replica_seed",
    "task_names",
]

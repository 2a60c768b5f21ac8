"""Equations of motion, batched over replicas."""

from controlmd.dynamics.base import (
    ControlSchedule,
    Integrator,
    Schedule,
    State,
    kinetic_energy,
    maxwell_boltzmann,
)
from controlmd.dynamics.brownian import Brownian

__all__ = [
    "Brownian",
    "ControlSchedule",
    "Integrator",
    "Schedule",
    "State",
    "kinetic_energy",
    "maxwell_boltzmann",
]

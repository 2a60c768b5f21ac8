"""Equations of motion, batched over replicas."""

from controlmd.dynamics.base import (
    CONTROL_TIME_OFFSET,
    ControlSchedule,
    Integrator,
    IntegratorWrapper,
    MomentumIntegrator,
    Schedule,
    State,
    kinetic_energy,
    maxwell_boltzmann,
)
from controlmd.dynamics.brownian import Brownian
from controlmd.dynamics.fused import FusedSteps, use_fused_steps
from controlmd.dynamics.langevin import Langevin
from controlmd.dynamics.nose_hoover import NoseHooverChain
from controlmd.dynamics.nve import NVE

__all__ = [
    "CONTROL_TIME_OFFSET",
    "NVE",
    "Brownian",
    "ControlSchedule",
    "FusedSteps",
    "Integrator",
    "IntegratorWrapper",
    "Langevin",
    "MomentumIntegrator",
    "NoseHooverChain",
    "Schedule",
    "State",
    "kinetic_energy",
    "maxwell_boltzmann",
    "use_fused_steps",
]

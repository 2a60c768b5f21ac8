"""Equations of motion, batched over replicas."""

from controlmd.dynamics.base import Integrator, State

__all__ = ["Integrator", "State"]

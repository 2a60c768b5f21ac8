"""The ``field`` control channel shared by the particle tasks (``assembly``,
``polymer_fold``): a neural field ``V_theta(x, t)`` from a ``neural_field`` protocol, the
checks that tie the two together, the field cost ``integral mean_i |F_i|^2 dt``
accumulated during the simulation, and its loss penalty.

A task opts in by deriving from :class:`FieldChannelTask` and setting ``space``,
``spatial_dim``, ``channel_kinds`` and ``field_cost_every`` in its ``__init__``; it adds
:meth:`FieldChannelTask.field_potential` to its Hamiltonian and
:meth:`FieldChannelTask.add_field_cost` to its loss. Tasks with further spatial terms
(``assembly``'s basis field and confinement) extend :meth:`~FieldChannelTask.field_potential`
and :meth:`~FieldChannelTask.max_field`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from controlmd.dynamics.base import State
from controlmd.dynamics.fused import fused_steps_setting
from controlmd.errors import ControlMDError
from controlmd.potentials.base import Potential
from controlmd.potentials.fields import NeuralField, mean_square_force
from controlmd.protocols import NeuralFieldProtocol, Protocol
from controlmd.simulate import final_state, simulate
from controlmd.space import Space
from controlmd.tasks._artifacts import RunArtifacts

Tensor = torch.Tensor

__all__ = ["FieldChannelTask"]


class FieldChannelTask(RunArtifacts):
    """Base of the particle tasks with a ``field`` control.

    Class attributes (for error messages): ``field_system``, what the field acts on
    (``"the assembly disks"``), and ``field_region``, where they move (``"the assembly
    box"``). Instance attributes set by the subclass: ``space`` (periodic: the field needs
    Fourier features; free: Cartesian features relative to the centre of mass),
    ``spatial_dim``, ``channel_kinds`` (the ``controls`` list) and ``field_cost_every``.
    """

    field_system: ClassVar[str]
    field_region: ClassVar[str]

    space: Space
    spatial_dim: int
    channel_kinds: tuple[str, ...]
    field_cost_every: int

    # ------------------------------------------------------------------ the field

    def neural_field(self, protocol: Protocol | None) -> NeuralField | None:
        """The neural field of a ``neural_field`` protocol, switched off in its release
        window; ``None`` without the ``field`` control or such a protocol."""
        if "field" in self.channel_kinds and isinstance(protocol, NeuralFieldProtocol):
            return NeuralField(protocol.field, self.space, envelope=protocol.release_envelope)
        return None

    def field_potential(self, protocol: Protocol | None) -> Potential | None:
        """The spatial control terms driven by ``protocol``, summed (here: the neural
        field); ``None`` when there are none."""
        return self.neural_field(protocol)

    def max_field(self, protocol: Protocol) -> float | None:
        """Bound on ``|V(x, t)|`` (energy units): the neural ``V_max`` (0 for a protocol
        without a field); ``None`` without the ``field`` control."""
        if "field" not in self.channel_kinds:
            return None
        return protocol.field.v_max if isinstance(protocol, NeuralFieldProtocol) else 0.0

    def check_protocol(self, protocol: Protocol) -> None:
        """A ``field`` control needs a ``neural_field`` protocol and vice versa; its field
        must have the system's dimension, Fourier features in a periodic box and Cartesian
        features relative to the centre of mass in free space, and one species."""
        super().check_protocol(protocol)
        has_field = isinstance(protocol, NeuralFieldProtocol)
        if "field" in self.channel_kinds and not has_field:
            raise ControlMDError(
                f"controls include 'field' but the protocol kind is {protocol.kind!r}; use "
                "kind = 'neural_field' (or drop 'field' from controls)"
            )
        if has_field and "field" not in self.channel_kinds:
            raise ControlMDError(
                "a neural_field protocol needs 'field' in the task's controls, got "
                f"{list(self.channel_kinds)}"
            )
        if not isinstance(protocol, NeuralFieldProtocol):
            return
        net = protocol.field
        if net.dim != self.spatial_dim:
            raise ControlMDError(
                f"field_dim = {net.dim}, but {self.field_system} move in d = {self.spatial_dim}"
            )
        if self.space.periodic:
            if net.features != "fourier":
                raise ControlMDError(
                    f"field_features = {net.features!r}: {self.field_region} is periodic, "
                    "use 'fourier'"
                )
        else:
            if net.features != "cartesian":
                raise ControlMDError(
                    f"field_features = {net.features!r}: {self.field_region} is in free "
                    "space (no box), use 'cartesian' with field_com_relative = true"
                )
            if not net.com_relative:
                raise ControlMDError(
                    f"field_com_relative = false: {self.field_region} is in free space, so "
                    "the field must move with it; use field_com_relative = true (positions "
                    "relative to the centre of mass)"
                )
        if net.n_species != 1:
            raise ControlMDError(
                f"field_species = {net.n_species}, but {self.field_system} are one species "
                "(a per-particle label would key the field to a particle's index); use "
                "field_species = 1"
            )

    # ------------------------------------------------------------------ field cost

    def advance(
        self, state: State, protocol: Protocol, n_steps: int, **simulate_options: Any
    ) -> State:
        """Simulate ``n_steps``; with a spatial field, also accumulate the field cost
        ``integral mean_i |F_i|^2 dt`` into ``aux["field_cost"]`` ``[B]`` (trapezoid over
        frames every ``field_cost_every`` steps and the last step; differentiable)."""
        integrator = self.integrator(protocol)
        field = self.field_potential(protocol)
        if field is None or n_steps == 0:
            return final_state(integrator, state, n_steps, **simulate_options)
        chunk, _ = fused_steps_setting()
        if chunk:
            raise ControlMDError(
                f"[experiment] fused_steps = {chunk} runs potentials s(t) E(R); "
                f"{self.field_system} carry a spatial control field V(x, t) (and its field "
                "cost frames): set fused_steps = 0"
            )
        if simulate_options.get("gradient") == "reversible":
            raise ControlMDError(
                "gradient = 'reversible' keeps no frames, so the field cost cannot be "
                "accumulated; use 'direct' or 'checkpoint'"
            )

        def rate(s: State) -> Tensor:
            return mean_square_force(field, s.R, s.t)

        traj = simulate(
            integrator,
            state,
            n_steps,
            record_every=self.field_cost_every,
            observables={"rate": rate},
            **simulate_options,
        )
        final = traj.final
        times, values = traj.times.to(torch.float64), traj.records["rate"].to(torch.float64)
        if float(times[-1]) < float(final.t) - 0.5 * self.dt:
            times = torch.cat([times, final.t.reshape(1).to(times)])
            values = torch.cat([values, rate(final).to(values).unsqueeze(0)])
        cost = torch.trapezoid(values, times, dim=0)
        previous = state.aux.get("field_cost")
        if previous is not None:
            cost = cost + previous.to(cost)
        return final.replace(aux={**final.aux, "field_cost": cost})

    def add_field_cost(self, loss: Tensor, state: State) -> Tensor:
        """``loss + w * mean_b field_cost`` with ``w`` the ``field_cost_weight`` of the
        protocol last simulated (``loss`` itself when ``w = 0`` or there is no cost)."""
        weight = 0.0 if self._protocol is None else self._protocol.field_cost_weight
        if weight > 0 and "field_cost" in state.aux:
            loss = loss + weight * state.aux["field_cost"].mean().to(loss)
        return loss

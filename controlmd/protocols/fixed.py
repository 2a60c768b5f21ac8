"""Protocols with nothing to learn: no channels, and a value held by the caller (the env)."""

from __future__ import annotations

import torch

from controlmd.errors import ControlMDError
from controlmd.protocols.base import Protocol, Tensor, register_protocol


@register_protocol("none")
class NoControl(Protocol):
    """The empty protocol (``u(t)`` has no components, no parameters) of a task without
    control channels, such as a learning task whose trainable object is its own
    Hamiltonian (the optional ``Task.parameters()`` hook the trainer optimizes).

    Args:
        t_final: horizon.
        dim: number of channels; must be 0 (the config fills in the task's).
    """

    min_dim = 0
    pure_in_time = True

    def __init__(self, *, t_final: float, dim: int = 0) -> None:
        if dim != 0:
            raise ControlMDError(
                f"protocol kind 'none' has no control channels, but dim = {dim}; this task has "
                "control channels: choose another kind"
            )
        super().__init__(dim=0, t_final=t_final)

    def raw(self, t: Tensor) -> Tensor:
        return t.new_zeros(t.shape[0], 0)


class HeldControl(Protocol):
    """A control value set from outside and held until changed (the gymnasium env's action).

    ``set(u)`` with ``u`` of shape ``[k]`` (same for all replicas) or ``[B, k]`` (one value
    per replica); ``forward`` returns it whatever ``t`` is.
    """

    pure_in_time = True  # set() assigns a new tensor, which the memo sees

    def __init__(self, *, dim: int, t_final: float, value: Tensor | None = None) -> None:
        super().__init__(dim=dim, t_final=t_final)
        self.register_buffer(
            "value", torch.zeros(dim, dtype=torch.float64) if value is None else value
        )

    def set(self, u: Tensor) -> None:
        if u.shape[-1] != self.dim:
            raise ControlMDError(
                f"control value has last dimension {u.shape[-1]}, expected {self.dim}"
            )
        self.value = u.detach().to(torch.float64)

    def raw(self, t: Tensor) -> Tensor:
        raise NotImplementedError  # forward is overridden

    def forward(self, t: Tensor | float, obs: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t)
        if t.ndim == 0:
            return self.value
        return self.value.expand(t.shape[0], *self.value.shape)

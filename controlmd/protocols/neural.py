"""Neural protocols: an MLP of Fourier time features, and feedback u(t, obs)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from controlmd._validation import check_choice, check_int, check_positive
from controlmd.errors import ControlMDError
from controlmd.protocols.base import Protocol, Tensor, register_protocol


def _time_features(s: Tensor, n_frequencies: int) -> Tensor:
    """``[s, cos(pi j s), sin(pi j s)]`` for ``j = 1..F``: ``[T]`` -> ``[T, 1 + 2F]``.

    Half-period frequencies (pi, not 2 pi) keep the features non-periodic on ``[0, 1]``.
    """
    j = torch.arange(1, n_frequencies + 1, dtype=s.dtype, device=s.device)
    phase = math.pi * s.unsqueeze(-1) * j
    return torch.cat([s.unsqueeze(-1), torch.cos(phase), torch.sin(phase)], dim=-1)


class _MLPWithSkip(nn.Module):
    """``net(x) + skip(x)``: an MLP plus a linear readout of its inputs (both start at zero).

    The linear path makes protocols that are linear in the features (e.g. a straight line
    in time) exactly representable, and fits to them exact.
    """

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, activation: str) -> None:
        super().__init__()
        self.net = _mlp(n_in, hidden, n_out, activation)
        self.skip = nn.Linear(n_in, n_out, bias=False, dtype=torch.float64)
        nn.init.zeros_(self.skip.weight)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x) + self.skip(x)
        return out

    def fit_readout(self, x: Tensor, target: Tensor) -> None:
        """Least-squares output and skip layers on the hidden features (start of an MLP fit)."""
        head = self.net[-1]
        if not isinstance(head, nn.Linear):
            raise TypeError(f"the MLP's output layer must be nn.Linear, got {type(head).__name__}")
        x = x.to(head.weight)
        H = self.net[:-1](x)
        A = torch.cat([H, x, torch.ones_like(H[:, :1])], dim=1)
        solution = torch.linalg.lstsq(A, target.to(A), driver="gelsd").solution
        width = H.shape[1]
        head.weight.copy_(solution[:width].T)
        self.skip.weight.copy_(solution[width:-1].T)
        head.bias.copy_(solution[-1])


def _mlp(n_in: int, hidden: Sequence[int], n_out: int, activation: str) -> nn.Sequential:
    acts: dict[str, Callable[[], nn.Module]] = {
        "tanh": nn.Tanh,
        "silu": nn.SiLU,
        "relu": nn.ReLU,
        "gelu": nn.GELU,
    }
    check_choice("activation", activation, list(acts))
    layers: list[nn.Module] = []
    for width in hidden:
        check_int("hidden width", width)
        layers += [nn.Linear(n_in, width, dtype=torch.float64), acts[activation]()]
        n_in = width
    last = nn.Linear(n_in, n_out, dtype=torch.float64)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


@register_protocol("mlp")
class MLPProtocol(Protocol):
    """``raw(t) = MLP(f) + W f`` with time features ``f = [s, cos(pi j s), sin(pi j s)]_{j=1..F}``, s = t/T.

    The output layer and the linear readout ``W`` start at zero, i.e. u(t) at the middle
    of the bounds (use ``init`` in :func:`make_protocol` / the experiment file to start
    elsewhere; the fit solves the readouts by least squares, then refines all weights).

    Args:
        hidden: hidden layer widths.
        n_frequencies: number of Fourier time features ``F`` (>= 0).
        activation: ``tanh``, ``silu``, ``relu`` or ``gelu``.
        dim, t_final, low, high, start, end, fluence_weight: see :class:`Protocol`.
    """

    def __init__(
        self,
        *,
        dim: int = 1,
        t_final: float,
        hidden: Sequence[int] = (32, 32),
        n_frequencies: int = 4,
        activation: str = "tanh",
        **base: Any,
    ) -> None:
        super().__init__(dim=dim, t_final=t_final, **base)
        check_int("n_frequencies", n_frequencies, minimum=0)
        self.n_frequencies = n_frequencies
        self.net = _MLPWithSkip(1 + 2 * n_frequencies, list(hidden), dim, activation)

    def raw(self, t: Tensor) -> Tensor:
        out: Tensor = self.net(_time_features(t / self.t_final, self.n_frequencies))
        return out

    def _fit_raw(self, t: Tensor, raw_target: Tensor) -> None:
        self.net.fit_readout(_time_features(t / self.t_final, self.n_frequencies), raw_target)
        super()._fit_raw(t, raw_target)


@register_protocol("feedback_mlp")
class FeedbackMLP(Protocol):
    """Feedback control ``u(t, obs)``: an MLP (plus a linear readout) of time features and observations.

    ``forward(t, obs)`` with ``t`` 0-d and ``obs`` ``[B, obs_dim]`` returns ``[B, k]``;
    without ``obs`` (plots, tables) the observation is taken as zero.

    Args:
        obs_dim: number of observed features (``task.observe(state).shape[1]``).
        obs_scale: observations are divided by it before entering the network.
        hidden, n_frequencies, activation: as in :class:`MLPProtocol`.
        dim, t_final, low, high, fluence_weight: see :class:`Protocol`.
    """

    feedback = True

    def __init__(
        self,
        *,
        dim: int = 1,
        t_final: float,
        obs_dim: int,
        obs_scale: float = 1.0,
        hidden: Sequence[int] = (32, 32),
        n_frequencies: int = 4,
        activation: str = "tanh",
        **base: Any,
    ) -> None:
        if base.get("start") is not None or base.get("end") is not None:
            raise ControlMDError("feedback_mlp does not support fixed start/end values")
        super().__init__(dim=dim, t_final=t_final, **base)
        check_int("obs_dim", obs_dim)
        check_positive("obs_scale", obs_scale)
        check_int("n_frequencies", n_frequencies, minimum=0)
        self.obs_dim = obs_dim
        self.obs_scale = float(obs_scale)
        self.n_frequencies = n_frequencies
        self.net = _MLPWithSkip(1 + 2 * n_frequencies + obs_dim, list(hidden), dim, activation)

    def raw_feedback(self, t: Tensor, obs: Tensor) -> Tensor:
        """Unsquashed values for times ``t [T]`` and observations ``obs [T, obs_dim]``."""
        features = _time_features(t / self.t_final, self.n_frequencies)
        out: Tensor = self.net(torch.cat([features, obs.to(features) / self.obs_scale], dim=-1))
        return out

    def raw(self, t: Tensor) -> Tensor:
        return self.raw_feedback(
            t, torch.zeros(t.shape[0], self.obs_dim, dtype=t.dtype, device=t.device)
        )

    def forward(self, t: Tensor | float, obs: Tensor | None = None) -> Tensor:
        if obs is None:
            return super().forward(t)
        t = torch.as_tensor(t, dtype=self._dtype())
        if t.ndim != 0 or obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ControlMDError(
                f"feedback protocol needs a scalar t and obs [B, {self.obs_dim}], got t {tuple(t.shape)}, "
                f"obs {tuple(obs.shape)}"
            )
        return self.squash(self.raw_feedback(t.expand(obs.shape[0]), obs))

    def _fit_raw(self, t: Tensor, raw_target: Tensor) -> None:
        # Fit the open-loop part (obs = 0); the weights on obs keep their random init.
        inputs = torch.cat(
            [
                _time_features(t / self.t_final, self.n_frequencies),
                torch.zeros(t.shape[0], self.obs_dim, dtype=t.dtype),
            ],
            dim=-1,
        )
        self.net.fit_readout(inputs, raw_target)
        super()._fit_raw(t, raw_target)

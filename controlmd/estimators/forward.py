"""Forward-mode AD: one dual-number rollout per protocol parameter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from controlmd.errors import ControlMDError
from controlmd.estimators.base import (
    MAX_FORWARD_PARAMETERS,
    GradientEstimate,
    GradientEstimator,
    RolloutBatch,
)
from controlmd.protocols import Protocol
from controlmd.tasks.base import Task

Tensor = torch.Tensor


class ForwardEstimator(GradientEstimator):
    """Forward-mode AD: one dual-number rollout per protocol parameter."""

    name = "forward"

    def check(self, task: Task[Any], protocol: Protocol, params: Sequence[nn.Parameter]) -> None:
        super().check(task, protocol, params)
        if [p for p in task.parameters() if p.requires_grad]:
            raise ControlMDError(
                "estimator = 'forward' differentiates protocol parameters only; use 'pathwise'"
            )
        if protocol.feedback:
            raise ControlMDError("estimator = 'forward' supports open-loop protocols only")
        n_params = sum(p.numel() for p in params)
        if n_params > MAX_FORWARD_PARAMETERS:
            raise ControlMDError(
                f"estimator = 'forward' costs one rollout per parameter; the protocol has "
                f"{n_params} (allowed: <= {MAX_FORWARD_PARAMETERS}); use estimator = 'pathwise'"
            )

    def estimate(self, batch: RolloutBatch, seed: int, with_variance: bool) -> GradientEstimate:
        protocol = batch.protocol
        names = [n for n, p in protocol.named_parameters() if p.requires_grad]
        params = batch.params
        grads = [torch.zeros_like(p) for p in params]
        objective = _RolloutObjective(
            batch.task,
            protocol,
            batch.shard.count,
            batch.simulate_options,
            first_replica=batch.shard.first,
        )
        value = torch.zeros((), dtype=torch.float64)
        rollouts = 0
        for k, (name, p) in enumerate(zip(names, params)):
            for j in range(p.numel()):
                tangent = torch.zeros_like(p)
                tangent.view(-1)[j] = 1.0
                with fwAD.dual_level():
                    swapped = {
                        f"protocol.{n}": (
                            fwAD.make_dual(q.detach().requires_grad_(True), tangent)
                            if n == name
                            else q.detach().requires_grad_(True)
                        )
                        for n, q in zip(names, params)
                    }
                    out = torch.func.functional_call(objective, swapped, (seed,))
                    primal, tangent_out = fwAD.unpack_dual(out)
                grads[k].view(-1)[j] = tangent_out.detach()
                value = primal.detach()
                rollouts += 1
        loss = value - protocol.penalty().detach()
        value, loss, *grads = batch.dist.all_reduce_mean([value, loss, *grads])
        md_steps = batch.replicas * batch.task.n_steps * rollouts
        return GradientEstimate(value, loss, grads, {}, md_steps)


class _RolloutObjective(nn.Module):
    """``loss(rollout(protocol))`` as a module, so ``functional_call`` can swap parameters."""

    def __init__(
        self,
        task: Task[Any],
        protocol: Protocol,
        replicas: int,
        options: dict[str, Any],
        *,
        first_replica: int = 0,
    ) -> None:
        super().__init__()
        self.task = task
        self.protocol = protocol
        self.replicas = replicas
        self.first_replica = first_replica
        self.options = options

    def forward(self, seed: int) -> Tensor:
        with torch.enable_grad():
            state = self.task.rollout(
                self.protocol, self.replicas, seed, first_replica=self.first_replica, **self.options
            )
            return self.task.loss(state) + self.protocol.penalty()

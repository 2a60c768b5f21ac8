"""Replica ensembles sharded over processes with ``torch.distributed``.

A training run launched by ``torchrun`` (one process per rank, on one or several nodes)
splits its ``B`` replicas into ``W`` equal, contiguous shards: rank ``r`` simulates the
global replicas ``r*B/W ... (r+1)*B/W - 1``, each with its own seed stream
(:class:`controlmd.rng.ReplicaRNG` with ``first_replica``), so replica ``i`` receives the same
noise whatever ``W``. Every rank keeps a full copy of the protocol and the optimizer; after
each backward pass the loss and the protocol gradient are averaged over ranks, so every
rank applies the same update and the parameters stay identical.

**Sharding rule: refuse, never pad.** ``W`` must divide the replica count of training
(:meth:`DistributedContext.shard` raises :class:`~controlmd.errors.ConfigError`
otherwise). A task's loss is a mean over replicas; with equal shards the mean of the
ranks' local means is that global mean, so a run on ``W`` processes optimizes exactly
the objective of a run on one process with the same replicas and seeds. Padding would add
replicas (another ensemble) or masked replicas (wasted work and a weighted mean whose
rounding depends on ``W``). Evaluations, which only sum the exact metric, accept any
replica count (:meth:`DistributedContext.split` gives the first ``n % W`` ranks one more).

**Reductions are deterministic.** :meth:`DistributedContext.all_reduce_sum` gathers every
rank's tensor and adds them in rank order on every rank, rather than calling
``all_reduce``, whose summation order depends on the backend's algorithm: every rank
then holds bit-identical sums, so the protocol copies never drift apart, and a rerun
reproduces the run bit for bit.

**Backends.** ``gloo`` on CPU, ``nccl`` when CUDA is available (``backend="auto"``).
Collectives go through :attr:`DistributedContext.device` (``cuda:LOCAL_RANK`` for NCCL):
tensors are moved there for the exchange and back to their own device and dtype.

**Who writes.** Only rank 0 (:attr:`DistributedContext.is_main`) writes the run
directory, TensorBoard events, checkpoints and metrics; other ranks compute only.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``)
:func:`init_distributed` returns the single-process context, whose collectives return
their inputs unchanged, so one code path serves both.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from controlmd._validation import check_choice
from controlmd.errors import ConfigError, ControlMDError

Tensor = torch.Tensor

__all__ = [
    "BACKENDS",
    "DistributedContext",
    "Shard",
    "init_distributed",
    "local_groups",
]

BACKENDS = ("auto", "gloo", "nccl")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Shard:
    """The replicas one rank holds: global indices ``first ... first + count - 1`` of ``total``."""

    first: int
    count: int
    total: int

    @property
    def stop(self) -> int:
        return self.first + self.count


class DistributedContext:
    """Rank, world size and the collectives the trainer needs.

    The default instance is the single process (rank 0 of 1): ``shard`` returns every
    replica and the collectives return their inputs, so code written against this
    class runs unchanged without ``torchrun``.

    :param rank: this process's global rank.
    :param world_size: number of processes ``W``.
    :param local_rank: rank on this node (picks the GPU under NCCL).
    :param backend: ``"gloo"`` or ``"nccl"`` (``None`` for the single process).
    :param device: where collective buffers live (``cpu`` for gloo, ``cuda:local_rank`` for NCCL).
    :param owns_group: whether :meth:`close` destroys the process group (it was created here).
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        *,
        local_rank: int = 0,
        backend: str | None = None,
        device: torch.device | str = "cpu",
        owns_group: bool = False,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ControlMDError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        if world_size > 1 and backend is None:
            raise ControlMDError(f"world_size = {world_size} needs a backend ('gloo' or 'nccl')")
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.backend = backend
        self.device = torch.device(device)
        self._owns_group = owns_group

    def __repr__(self) -> str:
        return (
            f"DistributedContext(rank={self.rank}, world_size={self.world_size}, "
            f"backend={self.backend!r}, device={str(self.device)!r})"
        )

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    # ------------------------------------------------------------------ sharding

    def shard(self, n_replicas: int, *, what: str = "[train] replicas") -> Shard:
        """This rank's equal share of ``n_replicas`` training replicas.

        :raises ConfigError: when the world size does not divide ``n_replicas`` (see the
            module docstring for why this refuses rather than pads).
        """
        W = self.world_size
        if n_replicas % W:
            lower = n_replicas // W * W
            options = f"{lower} or {lower + W}" if lower else f"{W}"
            raise ConfigError(
                f"{what} = {n_replicas} cannot be split over {W} processes: the world size must "
                f"divide the replica count (each rank simulates an equal share, so the loss and "
                f"gradient are exact means over all replicas; controlmd refuses rather than pads). "
                f"Use a multiple of {W}, e.g. {options}, or another number of processes"
            )
        count = n_replicas // W
        return Shard(self.rank * count, count, n_replicas)

    def split(self, n_replicas: int) -> Shard:
        """This rank's contiguous block of ``n_replicas`` (any count; for evaluations)."""
        base, extra = divmod(n_replicas, self.world_size)
        first = self.rank * base + min(self.rank, extra)
        return Shard(first, base + (1 if self.rank < extra else 0), n_replicas)

    # ------------------------------------------------------------------ collectives

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Elementwise sums over ranks of each tensor, added in rank order on every rank.

        One collective carries all tensors (flattened and concatenated in float64). Each
        result has its input's shape, dtype and device and no autograd history. With one
        process the inputs are returned as they are.
        """
        if not self.enabled:
            return list(tensors)
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors])
        gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(gathered, flat)
        total = gathered[0].clone()
        for part in gathered[1:]:
            total += part
        out, offset = [], 0
        for t in tensors:
            n = t.numel()
            out.append(total[offset : offset + n].reshape(t.shape).to(t.device, t.dtype))
            offset += n
        return out

    def all_reduce_mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Means over ranks (sums divided by the world size); with one process, the inputs."""
        if not self.enabled:
            return list(tensors)
        return [t / self.world_size for t in self.all_reduce_sum(tensors)]

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` ``[n, ...]`` concatenated along dim 0 in rank order ``[W*n, ...]``.

        All ranks must pass the same shape (equal shards). Detached, on the input's device.
        """
        if not self.enabled:
            return tensor
        local = tensor.detach().to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def broadcast_(self, tensors: Sequence[Tensor], *, src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values (e.g. initial parameters)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in tensors:
                buf = t.detach().to(self.device)
                dist.broadcast(buf, src=src)
                t.copy_(buf.to(t.device))

    def broadcast_object(self, obj: Any, *, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank (e.g. the run directory it chose)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(
            box, src=src, device=self.device if self.backend == "nccl" else None
        )
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


def local_groups(shard: Shard, n_groups: int) -> list[tuple[list[int], float]]:
    """This rank's members of the global replica groups ``g, g+G, g+2G, ...`` (``G = n_groups``).

    Returns, per group, the local indices (``0 ... shard.count-1``) of its members held
    here and the fraction of the group they make up. A group's mean over its members is the
    sum over ranks of ``fraction * (mean over the local members)``, so per-group quantities
    (the trainer's gradient-variance estimate) come out the same for any world size. A
    group with no member here has fraction 0.
    """
    out = []
    for g in range(n_groups):
        size = len(range(g, shard.total, n_groups))
        local = [i - shard.first for i in range(shard.first, shard.stop) if i % n_groups == g]
        out.append((local, len(local) / size if size else 0.0))
    return out


def init_distributed(backend: str = "auto", *, timeout_s: float = 1800.0) -> DistributedContext:
    """The process group described by ``torchrun``'s environment, or the single process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
    (set by ``torchrun``). Without ``WORLD_SIZE``, or with ``WORLD_SIZE=1``, no group is
    created. If a default process group already exists (the caller made one), it is used
    and left open on :meth:`DistributedContext.close`.

    :param backend: ``"auto"`` (``nccl`` when CUDA is available, else ``gloo``), ``"gloo"``
        or ``"nccl"``.
    :param timeout_s: how long a collective may wait for the other ranks (s).
    :raises ConfigError: a partial torchrun environment, or NCCL without a GPU.
    """
    check_choice("backend", backend, BACKENDS)
    if dist.is_available() and dist.is_initialized():
        chosen = dist.get_backend()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if chosen == "nccl" else torch.device("cpu")
        return DistributedContext(
            dist.get_rank(),
            dist.get_world_size(),
            local_rank=local_rank,
            backend=chosen,
            device=device,
        )
    world = os.environ.get("WORLD_SIZE")
    if world is None or int(world) == 1:
        return DistributedContext()
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} not; launch with "
            "`torchrun --nproc_per_node N ...`, which sets them all"
        )
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run on one process")
    rank, world_size = int(os.environ["RANK"]), int(world)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("backend 'nccl' needs CUDA GPUs; use 'gloo' on CPU")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return DistributedContext(
        rank, world_size, local_rank=local_rank, backend=backend, device=device, owns_group=True
    )

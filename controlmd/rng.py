"""Per-replica random streams.

Replica ``i`` of a batch seeded ``s`` draws from its own ``torch.Generator`` seeded
``replica_seed(s, i) = s + i * SEED_STRIDE``. Because ``replica_seed(s, 0) == s``, replica
``i`` of a batch seeded ``s`` is bit-identical to a one-replica run seeded
``replica_seed(s, i)``, whatever the batch size (the gymnasium envs and the distributed
trainer rely on this).

torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so seeds that agree
modulo 2**32 give the same stream: keep ``seed + B * SEED_STRIDE`` below 2**32 (B < 4294
replicas for seed 0) when every replica's stream must be distinct.
"""

from __future__ import annotations

import torch

from controlmd._validation import check_int

Tensor = torch.Tensor

SEED_STRIDE = 1_000_003
"""Distance between the seeds of consecutive replicas (a prime, so streams rarely collide)."""

# torch's CPU generators keep only the low 32 bits of a seed, and replica i of a batch
# seeded s draws from s + i * SEED_STRIDE (mod 2**32). These offsets were searched so that,
# for base seeds < 2000 and < 10_000 training iterations, no training stream of a batch of
# up to 200_000 replicas coincides with an evaluation stream, nor two evaluation batches.
EVAL_SEED_OFFSET = 828_979_348
"""Held-out evaluations during training use batch seed ``seed + EVAL_SEED_OFFSET``."""
FINAL_SEED_OFFSET = 1_877_134_342
"""The before/after scoring of a run uses batch seed ``seed + FINAL_SEED_OFFSET``."""
RESCORE_SEED_OFFSET = 573_356_475
"""Re-scoring a finished protocol on fresh replicas (compare, sweeps) uses this offset."""

__all__ = [
    "EVAL_SEED_OFFSET",
    "FINAL_SEED_OFFSET",
    "RESCORE_SEED_OFFSET",
    "SEED_STRIDE",
    "ReplicaRNG",
    "replica_seed",
]


def replica_seed(seed: int, index: int) -> int:
    """Seed of replica ``index`` in a batch seeded ``seed``: ``seed + index * SEED_STRIDE``."""
    return int(seed) + int(index) * SEED_STRIDE


class ReplicaRNG:
    """``B`` independent generators, one per replica.

    Draws are made replica by replica, so each replica's stream is independent of ``B``.

    Args:
        seed: batch seed ``s``.
        n_replicas: ``B``.
        first_replica: global index of the first replica held here (for sharding a batch
            across processes: rank r holds replicas ``first_replica ... first_replica+B-1``).
        device: where the generators live.
    """

    def __init__(
        self,
        seed: int,
        n_replicas: int,
        *,
        first_replica: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        check_int("n_replicas", n_replicas)
        check_int("first_replica", first_replica, minimum=0)
        self.seed = int(seed)
        self.first_replica = first_replica
        self.device = torch.device(device)
        self.generators = []
        for i in range(n_replicas):
            g = torch.Generator(device=self.device)
            g.manual_seed(replica_seed(self.seed, first_replica + i) % (2**63))
            self.generators.append(g)

    @property
    def n_replicas(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """Standard normal draws of shape ``[B, *shape]``."""
        return torch.stack(
            [
                torch.randn(shape, generator=g, dtype=dtype, device=self.device)
                for g in self.generators
            ]
        )

    def rand(self, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """Uniform [0, 1) draws of shape ``[B, *shape]``."""
        return torch.stack(
            [
                torch.rand(shape, generator=g, dtype=dtype, device=self.device)
                for g in self.generators
            ]
        )

    def get_state(self) -> list[Tensor]:
        """Generator states, for exact-resume checkpoints."""
        return [g.get_state() for g in self.generators]

    def set_state(self, states: list[Tensor]) -> None:
        if len(states) != len(self.generators):
            raise ValueError(
                f"RNG state holds {len(states)} replicas, this ReplicaRNG has {len(self.generators)}"
            )
        for g, s in zip(self.generators, states):
            g.set_state(s)

    def select(self, index: int) -> ReplicaRNG:
        """A one-replica RNG sharing replica ``index``'s generator (state advances together)."""
        new = ReplicaRNG.__new__(ReplicaRNG)
        new.seed = self.seed
        new.first_replica = self.first_replica + index
        new.device = self.device
        new.generators = [self.generators[index]]
        return new

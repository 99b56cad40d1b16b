"""Seeded, resumable order over the experts of a buffer, split across data-parallel ranks.

Pass p visits the experts in the permutation drawn from (seed, p); rank r of `world` takes
positions r, r + world, ... of it. Each pass is cut to a multiple of `world` (the cut experts
differ from pass to pass), so every rank gets the same number of experts per pass, ranks move
to the next pass together and never share an expert within a pass. Only the requested expert's
tensor is read from its shard; the open handle of the current shard is the only thing cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ld3m.errors import CheckpointError, ConfigError, DataError
from ld3m.experts.store import ExpertStore, ShardMeta, Trajectory, tensor_name


def pass_order(seed: int, pass_index: int, count: int) -> list[int]:
    """The permutation of 0..count-1 used in pass `pass_index` (depends only on its arguments)."""
    state = np.random.SeedSequence([seed % 2**63, pass_index]).generate_state(1, np.uint64)[0]
    gen = torch.Generator().manual_seed(int(state) % 2**63)
    return torch.randperm(count, generator=gen).tolist()


def first_expert(buffer: str | Path) -> Trajectory:
    """The trajectory of the lowest-numbered expert of a buffer's complete shards (SRe2L's
    teacher, HeLlO's weak teachers)."""
    sampler = ExpertSampler(ExpertStore(Path(buffer)), seed=0)
    return sampler.load(sampler.ids[0])


class ExpertSampler:
    """Iterate trajectories of `store` in a seeded random order per pass; see the module doc."""

    def __init__(self, store: ExpertStore, seed: int, rank: int = 0, world: int = 1) -> None:
        """Index the complete shards of `store` (validated); rank `rank` of `world` ranks."""
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"expert sampler rank {rank} of {world}: need 0 <= rank < world")
        self.store, self.rank, self.world = store, rank, world
        info = store.describe()
        self._where: dict[int, tuple[ShardMeta, int]] = {
            k: (meta, pos) for meta in info.shards for pos, k in enumerate(meta.experts)
        }
        self._set_experts(sorted(self._where))
        self._seed, self._pass, self._cursor = seed, 0, 0
        self._order: list[int] | None = None
        self._handle: Any = None
        self._handle_path: Path | None = None

    def _set_experts(self, experts: list[int]) -> None:
        """Fix the expert ids this sampler draws from (checked against the store)."""
        missing = sorted(set(experts) - set(self._where))
        if missing:
            raise DataError(
                f"experts {missing[:5]} are no longer in {self.store.root}; restore their shards "
                "or start the run afresh"
            )
        if len(experts) < self.world:
            raise DataError(
                f"{self.store.root} holds {len(experts)} experts, fewer than {self.world} ranks; "
                "train more experts (experts.num) or use fewer ranks"
            )
        self._experts = list(experts)

    @property
    def ids(self) -> list[int]:
        """Expert ids this sampler draws from, ascending."""
        return list(self._experts)

    @property
    def per_pass(self) -> int:
        """Experts this rank gets per pass."""
        return len(self._experts) // self.world

    def _rank_order(self) -> list[int]:
        """Expert ids this rank visits in the current pass, in order."""
        if self._order is None:
            perm = pass_order(self._seed, self._pass, len(self._experts))
            cut = perm[: self.per_pass * self.world]
            self._order = [self._experts[j] for j in cut[self.rank :: self.world]]
        return self._order

    def next_expert(self) -> int:
        """Advance and return the id of the next expert (no tensor is read)."""
        if self._cursor >= self.per_pass:
            self._pass, self._cursor, self._order = self._pass + 1, 0, None
        expert = self._rank_order()[self._cursor]
        self._cursor += 1
        return expert

    def next(self) -> Trajectory:
        """Advance and return the next expert's trajectory (snapshots float32 [S, P])."""
        return self.load(self.next_expert())

    def __iter__(self) -> ExpertSampler:
        return self

    def __next__(self) -> Trajectory:
        return self.next()

    def load(self, expert: int) -> Trajectory:
        """Read one expert's trajectory from its shard."""
        meta, pos = self._where[expert]
        if self._handle_path != meta.path:
            self._handle = safe_open(str(meta.path), framework="pt")
            self._handle_path = meta.path
        snapshots = self._handle.get_tensor(tensor_name(expert))
        return Trajectory(
            snapshots, list(meta.test_acc[pos]), meta.spec.arch, meta.seeds[pos], expert
        )

    def state_dict(self) -> dict[str, Any]:
        """Position and seed; `load_state_dict` of it continues with the same sequence."""
        return {
            "seed": self._seed,
            "pass": self._pass,
            "cursor": self._cursor,
            "rank": self.rank,
            "world": self.world,
            "experts": list(self._experts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict` (same rank layout required; the expert set is restored too)."""
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise CheckpointError(
                f"expert sampler state is for rank {state['rank']} of {state['world']}, this is "
                f"rank {self.rank} of {self.world}; resume with the same number of ranks"
            )
        self._set_experts([int(k) for k in state["experts"]])
        self._seed, self._pass = int(state["seed"]), int(state["pass"])
        self._cursor, self._order = int(state["cursor"]), None

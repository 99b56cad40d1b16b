"""Seeds and random-number streams."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `seed` (results do not depend on the device)."""
    return torch.Generator().manual_seed(seed)


def stream_seed(*key: int) -> int:
    """A 63-bit seed that is a pure function of the integers `key`, e.g. (seed, step, rank,
    purpose): randomness that needs no saved state, the same in every process and Python run."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stream(*key: int) -> torch.Generator:
    """A CPU generator seeded with `stream_seed(*key)`."""
    return make_generator(stream_seed(*key))

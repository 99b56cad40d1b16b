"""Random-real baseline: IPC random real training images per class, the reference to beat."""

from __future__ import annotations

import torch

from ld3m.artifacts import SetMeta, SyntheticSet
from ld3m.data.datasets import RealDataset
from ld3m.errors import ConfigError


def random_real_set(data: RealDataset, ipc: int, seed: int) -> SyntheticSet:
    """Draw `ipc` distinct random training images of every class (seeded), class-sorted."""
    if ipc < 1:
        raise ConfigError(f"baseline.ipc must be >= 1, got {ipc}")
    gen = torch.Generator().manual_seed(seed)
    info = data.info
    images = torch.cat(
        [data.images_of_class(c, ipc, generator=gen) for c in range(info.num_classes)]
    )
    labels = torch.arange(info.num_classes).repeat_interleave(ipc)
    meta = SetMeta(
        dataset=info.name,
        num_classes=info.num_classes,
        channels=info.channels,
        res=info.res,
        mean=tuple(info.mean),
        std=tuple(info.std),
        ipc=ipc,
        method="random_real",
        class_names=tuple(info.class_names),
        extra={"seed": seed},
    )
    return SyntheticSet(images=images, labels=labels, meta=meta)

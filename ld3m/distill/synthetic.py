"""The learnable synthetic set: pixels, or LD3M latents Z and class embeddings c; hard labels and
an optional learnable student step size (MTT). All learnable state lives in this one module."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ld3m.data.datasets import RealDataset
from ld3m.errors import ConfigError
from ld3m.generator.ldm import LD3MGenerator, draw_noise, init_latents
from ld3m.prior.model import Prior

Space = Literal["latent", "pixel"]


class SyntheticSet(nn.Module):
    """`ipc` synthetic samples per class, class-sorted, in pixel or latent space."""

    def __init__(
        self,
        labels: torch.Tensor,
        space: Space,
        tensors: dict[str, torch.Tensor],
        syn_lr: float | None = None,
    ) -> None:
        super().__init__()
        self.space = space
        self.register_buffer("labels", labels.long().clone())
        if space == "pixel":
            self.images = nn.Parameter(tensors["images"].detach().clone())
        else:
            self.latents = nn.Parameter(tensors["latents"].detach().clone())
            self.context = nn.Parameter(tensors["context"].detach().clone())
        # shape [1], not a 0-dim scalar: DeepSpeed's parameter broadcast cannot view 0-dim tensors
        self.syn_lr = None if syn_lr is None else nn.Parameter(torch.tensor([float(syn_lr)]))

    def content(self) -> list[nn.Parameter]:
        """The parameters that make the images (pixels, or Z and c)."""
        return [self.images] if self.space == "pixel" else [self.latents, self.context]

    def param_groups(self, lr: float, lr_lr: float) -> list[dict]:
        """SGD groups: images/latents at `lr`, the step size at `lr_lr`."""
        groups = [{"params": self.content(), "lr": lr, "name": "content"}]
        if self.syn_lr is not None:
            groups.append({"params": [self.syn_lr], "lr": lr_lr, "name": "syn_lr"})
        return groups

    def render(self, generator: LD3MGenerator | None, noise: torch.Tensor | None) -> torch.Tensor:
        """Current images [N, C, H, W] (dataset-normalised), without gradients."""
        if self.space == "pixel":
            return self.images.detach().clone()
        assert generator is not None and noise is not None
        return generator.render(self.latents.detach(), self.context.detach(), noise)


def real_init_indices(data: RealDataset, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [C*ipc, ...] normalised, labels) of `ipc` random real images per class."""
    gen = torch.Generator().manual_seed(seed)
    n = data.info.num_classes
    images = torch.cat([data.images_of_class(c, ipc, generator=gen) for c in range(n)])
    return images, torch.arange(n).repeat_interleave(ipc)


def prior_classes(data: RealDataset, prior: Prior) -> torch.Tensor:
    """Prior class index of each dataset label (ImageNet index for ImageNet subsets)."""
    info = data.info
    if info.prior_classes is not None and prior.spec.num_classes > info.num_classes:
        return torch.tensor(info.prior_classes)
    if prior.spec.num_classes == info.num_classes:
        return torch.arange(info.num_classes)
    raise ConfigError(
        f"dataset {info.name} has {info.num_classes} classes but prior {prior.spec.source or ''} "
        f"has {prior.spec.num_classes} and no class map; train a prior on this dataset "
        "(`ld3m prior train`) or use an ImageNet subset with an ImageNet prior"
    )


def build_synthetic_set(
    data: RealDataset,
    space: Space,
    ipc: int,
    init: Literal["real", "noise"],
    seed: int,
    syn_lr: float | None,
    prior: Prior | None = None,
) -> SyntheticSet:
    """Initialise from random real images of each class (or Gaussian noise), seeded."""
    real, labels = real_init_indices(data, ipc, seed)
    if space == "pixel":
        images = real if init == "real" else draw_noise(tuple(real.shape), seed)
        return SyntheticSet(labels, "pixel", {"images": images}, syn_lr)
    if prior is None:
        raise ConfigError("distill.space=latent needs a prior: set prior.path")
    if prior.spec.channels != data.info.channels:
        raise ConfigError(
            f"prior makes {prior.spec.channels}-channel images but {data.info.name} has "
            f"{data.info.channels}; use a prior trained on this dataset"
        )
    classes = prior_classes(data, prior)[labels]
    images01 = data.denormalize(real) if init == "real" else None
    side = data.info.res // prior.spec.downsampling
    latents, context = init_latents(prior, classes, images01, latent_size=side, seed=seed)
    return SyntheticSet(labels, "latent", {"latents": latents, "context": context}, syn_lr)

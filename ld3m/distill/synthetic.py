"""The learnable synthetic set: pixels, or LD3M latents Z and class embeddings c; hard labels and
an optional learnable student step size (MTT). All learnable state lives in this one module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from ld3m.data.datasets import DatasetInfo, RealDataset
from ld3m.errors import ConfigError
from ld3m.generator.ldm import LD3MGenerator, draw_noise, init_latents
from ld3m.models.functional import functional_forward
from ld3m.models.networks import build_seeded_network
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


Embed = Callable[[torch.Tensor], torch.Tensor]
"""Features [B, D] of normalised images [B, C, H, W] (k-means initialisation)."""


def real_init_indices(
    data: RealDataset, ipc: int, seed: int, embed: Embed | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [C*ipc, ...] normalised, labels): `ipc` random real images per class, or with
    `embed` the representative ones (AST: the real image nearest each of k = ipc k-means
    centroids of the class's features)."""
    gen = torch.Generator().manual_seed(seed)
    n = data.info.num_classes
    if embed is None:
        images = torch.cat([data.images_of_class(c, ipc, generator=gen) for c in range(n)])
    else:
        x, y = data.train_tensors()
        images = torch.cat([representative_images(x[y == c], ipc, embed, gen) for c in range(n)])
    return images, torch.arange(n).repeat_interleave(ipc)


@torch.no_grad()
def representative_images(
    pool: torch.Tensor, k: int, embed: Embed, gen: torch.Generator, batch: int = 500
) -> torch.Tensor:
    """The k images of one class's pool [n, C, H, W] nearest the k-means centroids of their
    features."""
    if len(pool) < k:
        raise ConfigError(f"a class has {len(pool)} train images, fewer than ipc={k}")
    feats = torch.cat([embed(b) for b in pool.split(batch)]).double()
    return pool[nearest_distinct(feats, kmeans(feats, k, gen))]


def expert_logits(arch: str, experts: object | None, info: DatasetInfo) -> Embed:
    """Logits under the last snapshot of the buffer's first expert (AST's representative init)."""
    if experts is None or not hasattr(experts, "ids"):
        raise ConfigError("distill.init=kmeans reads an expert's logits; use it with "
                          "distill.objective=mtt and experts.dir")  # fmt: skip
    theta = experts.load(experts.ids[0]).snapshots[-1]
    net = build_seeded_network(arch, info.channels, info.num_classes, info.res, 0).eval()
    return lambda x: functional_forward(net, theta, x)


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 100) -> torch.Tensor:
    """Centroids [k, D] of points x [n, D]: k-means++ seeding from `gen`, then Lloyd steps
    until the assignment stops changing (at most `iters`)."""
    centroids = x[torch.randint(len(x), (1,), generator=gen)]
    while len(centroids) < k:
        d2 = torch.cdist(x, centroids).min(dim=1).values.square()
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=gen)]])
    assign = None
    for _ in range(iters):
        new = torch.cdist(x, centroids).argmin(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centroids[j] = members.mean(dim=0)
    return centroids


def nearest_distinct(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """For each centroid in turn, the index of the nearest point of x [n, D] not taken yet."""
    dist = torch.cdist(centroids, x)
    picked: list[int] = []
    for row in dist:
        row = row.clone()
        row[picked] = float("inf")
        picked.append(int(row.argmin()))
    return torch.tensor(picked)


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
    init: Literal["real", "noise", "kmeans"],
    seed: int,
    syn_lr: float | None,
    prior: Prior | None = None,
    embed: Embed | None = None,
) -> SyntheticSet:
    """Initialise from random real images of each class, representative ones (kmeans: needs
    `embed`), or Gaussian noise, seeded; latents by encoding the chosen images."""
    if init == "kmeans" and embed is None:
        raise ConfigError("distill.init=kmeans needs expert features; set experts.dir")
    real, labels = real_init_indices(data, ipc, seed, embed if init == "kmeans" else None)
    if space == "pixel":
        images = real if init != "noise" else draw_noise(tuple(real.shape), seed)
        return SyntheticSet(labels, "pixel", {"images": images}, syn_lr)
    if prior is None:
        raise ConfigError("distill.space=latent needs a prior: set prior.path")
    if prior.spec.channels != data.info.channels:
        raise ConfigError(
            f"prior makes {prior.spec.channels}-channel images but {data.info.name} has "
            f"{data.info.channels}; use a prior trained on this dataset"
        )
    classes = prior_classes(data, prior)[labels]
    images01 = data.denormalize(real) if init != "noise" else None
    side = data.info.res // prior.spec.downsampling
    latents, context = init_latents(prior, classes, images01, latent_size=side, seed=seed)
    return SyntheticSet(labels, "latent", {"latents": latents, "context": context}, syn_lr)

"""DM: distribution matching (Zhao & Bilen), as used by GLaD and LD3M (method notes 6.2).

A fresh random network per call, weights frozen; per class, the squared distance between the
mean embeddings (`net.embed`) of a DSA-augmented real batch and of the class's synthetic
images, both augmented with the same DSA draw. loss = sum over classes.

Draws from `rng`, in order: the network seed, then per class (increasing label): the real
batch, the DSA seed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ld3m.distill.objectives.base import (
    FreshNetworkObjective,
    ObjectiveOutput,
    class_indices,
    draw_seed,
    siamese,
)


class DistributionMatching(FreshNetworkObjective):
    """DM distribution matching on a fresh random frozen network per call."""

    name = "dm"

    def image_grad(
        self,
        images: Tensor,
        labels: Tensor,
        syn_lr: Tensor | None,
        rng: torch.Generator,
        iteration: int = 0,
    ) -> ObjectiveOutput:
        """Sum over classes of the mean-embedding distance and its gradient [N,C,H,W]."""
        net = self.fresh_network(rng, images).requires_grad_(False)
        grad = torch.zeros_like(images)
        total = 0.0
        groups = class_indices(labels)
        for c, idx in groups:
            real = self.data.images_of_class(c, self.cfg.batch_real, rng).to(images)
            seed = draw_seed(rng)
            syn = images[idx].detach().requires_grad_(True)
            with torch.enable_grad():
                loss_c = self.class_loss(net, real, syn, seed)
                grad[idx] = torch.autograd.grad(loss_c, syn)[0]
            total += float(loss_c.detach())
        return ObjectiveOutput(total, grad, None, {"dist_per_class": total / len(groups)})

    def class_loss(self, net: nn.Module, real: Tensor, syn: Tensor, seed: int) -> Tensor:
        """||mean embed(real) - mean embed(syn)||^2 for one class's [B,C,H,W] / [n,C,H,W]."""
        with torch.no_grad():
            mean_real = net.embed(siamese(self.aug, real, seed)).mean(dim=0)
        mean_syn = net.embed(siamese(self.aug, syn, seed)).mean(dim=0)
        return (mean_real - mean_syn).square().sum()

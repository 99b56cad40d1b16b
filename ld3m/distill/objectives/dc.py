"""DC: gradient matching (Zhao et al.), as used by GLaD and LD3M (method notes section 6.1).

A fresh random network per call (never trained: outer_loop = inner_loop = 1). For each class,
the gradient of the cross-entropy on a real batch is matched to the one on the class's
synthetic images with `distance_wb`, both batches augmented with the same DSA draw.

The research code averages g_real over two halves of the real batch; with per-sample norms
(instance norm, the default) and one Siamese DSA draw for the batch that equals the gradient on
the whole batch, which is what is computed here.

Draws from `rng`, in order: the network seed, then per class (increasing label): the real
batch, the DSA seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ld3m.distill.objectives.base import (
    FreshNetworkObjective,
    ObjectiveOutput,
    class_indices,
    draw_seed,
    siamese,
)


def distance_wb(g_real: Tensor, g_syn: Tensor) -> Tensor:
    """DC's layer distance: sum over output rows of 1 - cosine; 1-D tensors (bias, norm) give 0."""
    shape = g_real.shape
    if len(shape) == 1:
        return g_real.new_zeros(())
    if len(shape) != 2:
        g_real, g_syn = g_real.reshape(shape[0], -1), g_syn.reshape(shape[0], -1)
    dot = (g_real * g_syn).sum(dim=-1)
    norms = g_real.norm(dim=-1) * g_syn.norm(dim=-1)
    return (1 - dot / (norms + 1e-6)).sum()


def match_distance(g_real: Sequence[Tensor], g_syn: Sequence[Tensor]) -> Tensor:
    """Sum of distance_wb over corresponding parameter gradients."""
    return torch.stack([distance_wb(r, s) for r, s in zip(g_real, g_syn, strict=True)]).sum()


class GradientMatching(FreshNetworkObjective):
    """DC gradient matching on a fresh random network per call."""

    name = "dc"

    def image_grad(
        self, images: Tensor, labels: Tensor, syn_lr: Tensor | None, rng: torch.Generator
    ) -> ObjectiveOutput:
        """Sum over classes of the gradient-matching distance and its gradient [N,C,H,W]."""
        net = self.fresh_network(rng, images)
        params = [p for p in net.parameters() if p.requires_grad]
        grad = torch.zeros_like(images)
        total = 0.0
        groups = class_indices(labels)
        for c, idx in groups:
            real = self.data.images_of_class(c, self.cfg.batch_real, rng).to(images)
            seed = draw_seed(rng)
            syn = images[idx].detach().requires_grad_(True)
            with torch.enable_grad():
                loss_c = self.class_loss(net, params, real, syn, labels[idx], seed)
                grad[idx] = torch.autograd.grad(loss_c, syn)[0]
            total += float(loss_c.detach())
        return ObjectiveOutput(total, grad, None, {"dist_per_class": total / len(groups)})

    def class_loss(
        self,
        net: nn.Module,
        params: Sequence[Tensor],
        real: Tensor,
        syn: Tensor,
        syn_labels: Tensor,
        seed: int,
    ) -> Tensor:
        """L_c for real [B,C,H,W] and synthetic [n,C,H,W] images of one class (graph to syn)."""
        real_labels = syn_labels[:1].expand(real.shape[0])
        loss_real = F.cross_entropy(net(siamese(self.aug, real, seed)), real_labels)
        g_real = [g.detach() for g in torch.autograd.grad(loss_real, params)]
        loss_syn = F.cross_entropy(net(siamese(self.aug, syn, seed)), syn_labels)
        g_syn = torch.autograd.grad(loss_syn, params, create_graph=True)
        return match_distance(g_real, g_syn)

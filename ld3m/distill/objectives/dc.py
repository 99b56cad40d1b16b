"""DC: gradient matching (Zhao et al.), as used by GLaD and LD3M (method notes section 6.1), and
its contrastive variant DCC (Lee et al. 2022, seed-methods notes section 1).

A fresh random network per call (never trained: outer_loop = inner_loop = 1). For each class,
the gradient of the cross-entropy on a real batch is matched to the one on the class's
synthetic images with `distance_wb`, both batches augmented with the same DSA draw.

The research code averages g_real over two halves of the real batch; with per-sample norms
(instance norm, the default) and one Siamese DSA draw for the batch that equals the gradient on
the whole batch, which is what is computed here.

DCC matches ONE gradient: that of the mean cross-entropy over the whole synthetic set (each
class's images augmented with that class's DSA draw and passed through the network together)
against the class-average of the real per-class gradients, so the classes contrast. Its
bi-level warm-up uses DC's class-wise loss for the first `distill.dcc.warmup` of the
iterations (ld3m's DC, as GLaD's and LD3M's, has no inner loop, so only the outer warm-up acts).

Draws from `rng`, in order (DC and DCC alike): the network seed, then per class (increasing
label): the real batch, the DSA seed.
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
        self,
        images: Tensor,
        labels: Tensor,
        syn_lr: Tensor | None,
        rng: torch.Generator,
        iteration: int = 0,
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


class ContrastiveGradientMatching(GradientMatching):
    """DCC: the whole synthetic set's gradient against the class-averaged real gradient (DSAC
    with DSA: one shared draw per class), after a class-wise DC warm-up."""

    name = "dcc"

    def image_grad(
        self,
        images: Tensor,
        labels: Tensor,
        syn_lr: Tensor | None,
        rng: torch.Generator,
        iteration: int = 0,
    ) -> ObjectiveOutput:
        """The contrastive distance and its gradient [N,C,H,W] (DC's during the warm-up)."""
        if iteration < round(self.cfg.dcc.warmup * self.cfg.iterations):
            out = super().image_grad(images, labels, syn_lr, rng, iteration)
            out.stats["contrastive"] = 0.0
            return out
        net = self.fresh_network(rng, images)
        params = [p for p in net.parameters() if p.requires_grad]
        syn = images.detach().requires_grad_(True)
        g_real: list[Tensor] = [torch.zeros_like(p) for p in params]
        views, order = [], []
        groups = class_indices(labels)
        with torch.enable_grad():
            for c, idx in groups:
                real = self.data.images_of_class(c, self.cfg.batch_real, rng).to(images)
                seed = draw_seed(rng)
                real_labels = labels[idx[:1]].expand(real.shape[0])
                loss_real = F.cross_entropy(net(siamese(self.aug, real, seed)), real_labels)
                for acc, g in zip(g_real, torch.autograd.grad(loss_real, params), strict=True):
                    acc += g.detach() / len(groups)
                views.append(siamese(self.aug, syn[idx], seed))
                order.append(idx)
            loss_syn = F.cross_entropy(net(torch.cat(views)), labels[torch.cat(order)])
            g_syn = torch.autograd.grad(loss_syn, params, create_graph=True)
            loss = match_distance(g_real, g_syn)
            grad = torch.autograd.grad(loss, syn)[0]
        return ObjectiveOutput(float(loss.detach()), grad, None, {"contrastive": 1.0})

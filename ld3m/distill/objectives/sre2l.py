"""SRe2L's recover step with CDA's curriculum (seed-methods notes, section 3).

Invert a frozen BatchNorm teacher: for each synthetic batch (SRe2L optimises one image per class
per batch; here batch j holds the j-th image of every class),

    L_j = CE(f(A(x_j)), y_j) + lambda_BN sum_l w_l (|mu_l - mu_l^run|_2 + |var_l - var_l^run|_2)

with mu_l, var_l the batch+spatial statistics of BN layer l's input (w_1 = first_bn_weight,
other w_l = 1) and A = RandomResizedCrop(res, scale=(beta(t), 1)) -> horizontal flip -> cyclic
roll by 0..jitter px, one draw shared by the batch. beta(t) is SRe2L's constant min_scale or
CDA's curriculum from 1 down to min_scale over the first `milestone` of the iterations
(`crop_lower_bound`). No real data is read after the teacher's BN statistics.

Draws from `rng`, in order, per batch j: the crop (scale, log-ratio, top, left; up to 10
tries), the flip, the two roll offsets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ld3m.config.schema import DistillConfig, SRe2LConfig
from ld3m.data.datasets import RealDataset
from ld3m.distill.objectives.base import ObjectiveOutput
from ld3m.errors import ConfigError
from ld3m.models.teacher import bn_layers, load_teacher


def crop_lower_bound(cfg: SRe2LConfig, t: int, total: int) -> float:
    """beta(t): the crop's lower scale bound at iteration t of `total`."""
    low, end = cfg.min_scale, cfg.milestone * total
    if cfg.curriculum == "none" or t >= end:
        return low
    frac = t / end
    if cfg.curriculum == "cosine":
        return low + (1 - low) * (1 + math.cos(math.pi * frac)) / 2
    if cfg.curriculum == "linear":
        return low + (1 - low) * (1 - frac)
    return 1.0  # step: whole images until the milestone


def uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


def crop_box(res: int, scale_low: float, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop.get_params draws them
    (scale in [scale_low, 1], aspect ratio in [3/4, 4/3], 10 tries), from `gen`."""
    area = res * res
    for _ in range(10):
        target = area * uniform(gen, scale_low, 1.0)
        ratio = math.exp(uniform(gen, math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= res and 0 < h <= res:
            top = int(torch.randint(0, res - h + 1, (), generator=gen))
            left = int(torch.randint(0, res - w + 1, (), generator=gen))
            return top, left, h, w
    return 0, 0, res, res


def augment(x: Tensor, scale_low: float, jitter: int, gen: torch.Generator) -> Tensor:
    """Shared RandomResizedCrop -> flip -> cyclic roll of the batch x [B,C,H,W] (differentiable)."""
    res = x.shape[-1]
    top, left, h, w = crop_box(res, scale_low, gen)
    out = x[:, :, top : top + h, left : left + w]
    if (h, w) != (res, res):
        out = F.interpolate(out, size=(res, res), mode="bilinear", align_corners=False)
    if bool(torch.rand((), generator=gen) < 0.5):
        out = out.flip(-1)
    shifts = tuple(int(torch.randint(0, jitter + 1, (), generator=gen)) for _ in range(2))
    return torch.roll(out, shifts=shifts, dims=(2, 3))


@contextmanager
def bn_statistics(net: nn.Module) -> Iterator[list[tuple[nn.Module, Tensor, Tensor]]]:
    """While active, each forward of `net` appends (layer, mean, var) of every BN layer's input
    (over batch and space) to the yielded list."""
    seen: list[tuple[nn.Module, Tensor, Tensor]] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.ndim)]
        seen.append((module, x.mean(dim=dims), x.var(dim=dims, unbiased=False)))

    handles = [m.register_forward_hook(hook) for m in bn_layers(net)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


class BNInversion:
    """SRe2L/CDA recover: CE + BN-statistics matching against a frozen BatchNorm teacher."""

    name = "sre2l"
    uses_experts = True  # the teacher is expert 0 of experts.dir
    learns_lr = False
    clamps_pixels = True  # pixels stay in the valid range after each step (SRe2L)

    def __init__(
        self,
        cfg: DistillConfig,
        data: RealDataset,
        num_classes: int,
        channels: int,
        res: int,
        experts: object | None = None,
        *,
        teacher: nn.Module | None = None,
    ) -> None:
        """Invert the teacher of `experts` (its buffer), or the given frozen `teacher`."""
        if teacher is None:
            root = getattr(getattr(experts, "store", None), "root", "")
            teacher = load_teacher(root, data)
        self.cfg, self.teacher = cfg, teacher
        self.layers = bn_layers(teacher)
        if not self.layers:
            raise ConfigError("objective sre2l needs a BatchNorm teacher; train it with "
                              "experts.arch=ConvNetBN or ResNet18BN")  # fmt: skip

    def image_grad(
        self,
        images: Tensor,
        labels: Tensor,
        syn_lr: Tensor | None,
        rng: torch.Generator,
        iteration: int = 0,
    ) -> ObjectiveOutput:
        """Sum over the set's batches (j-th image of each class) of the recover loss."""
        s = self.cfg.sre2l
        low = crop_lower_bound(s, iteration, self.cfg.iterations)
        self.teacher.to(device=images.device, dtype=images.dtype)
        grad = torch.zeros_like(images)
        total, ce_total = 0.0, 0.0
        for idx in ipc_batches(labels):
            x = images[idx].detach().requires_grad_(True)
            with torch.enable_grad(), bn_statistics(self.teacher) as stats:
                logits = self.teacher(augment(x, low, s.jitter, rng))
                ce = F.cross_entropy(logits, labels[idx])
                loss = ce + s.bn_weight * self.bn_loss(stats)
                grad[idx] = torch.autograd.grad(loss, x)[0]
            total += float(loss.detach())
            ce_total += float(ce.detach())
        return ObjectiveOutput(total, grad, None, {"ce": ce_total, "crop_low": low})

    def bn_loss(self, stats: list[tuple[nn.Module, Tensor, Tensor]]) -> Tensor:
        """sum_l w_l (|mu_l - running_mean_l|_2 + |var_l - running_var_l|_2)."""
        terms = []
        for layer, mean, var in stats:  # w_1: the first BN layer the network defines (SRe2L)
            weight = self.cfg.sre2l.first_bn_weight if layer is self.layers[0] else 1.0
            terms.append(weight * ((mean - layer.running_mean).norm(2)
                                   + (var - layer.running_var).norm(2)))  # fmt: skip
        return torch.stack(terms).sum()


def ipc_batches(labels: Tensor) -> list[Tensor]:
    """Indices of batch j = the j-th image of every class, j = 0 .. (images per class) - 1."""
    per_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    depth = max(len(p) for p in per_class)
    return [torch.stack([p[j] for p in per_class if j < len(p)]) for j in range(depth)]

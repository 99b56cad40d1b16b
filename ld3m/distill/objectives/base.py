"""The matching-objective protocol and helpers shared by DC, DM and MTT.

An objective maps the current synthetic images to the gradient of its loss with respect to
those images (and, for MTT, to its learnable step size). The caller back-propagates that
gradient through whatever produced the images (the LD3M generator, or nothing in pixel
space): objectives never see latents.

Randomness: every random choice (network initialisation, real batches, DSA draws, expert start
epochs, minibatch permutations) is drawn from the CPU `torch.Generator` passed to
`image_grad`, never from torch's global RNG, so a run that re-seeds that generator per
iteration reproduces exactly after a resume. Networks are initialised by drawing a seed from
the generator and building the network inside `torch.random.fork_rng()` with that seed, which
leaves the global RNG state as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ld3m.config.schema import DistillConfig
from ld3m.data.augment import DiffAugment
from ld3m.data.datasets import RealDataset
from ld3m.errors import ConfigError
from ld3m.models.networks import build_seeded_network

SEED_HIGH = 2**62
"""Seeds drawn from an objective's generator lie in [0, SEED_HIGH)."""


@dataclass
class ObjectiveOutput:
    """One evaluation of a matching objective."""

    loss: float
    """The objective's loss (may be non-finite: the caller decides what to do)."""
    grad: Tensor
    """d loss / d images, shaped like the images [N, C, H, W]."""
    lr_grad: Tensor | None = None
    """d loss / d syn_lr (a scalar tensor) for objectives that learn a step size, else None."""
    stats: dict[str, float] = field(default_factory=dict)
    """Scalars worth logging (per objective)."""


class MatchingObjective(Protocol):
    """A distillation loss that returns its gradient with respect to the synthetic images."""

    name: str
    """Registry name ('dc', 'dcc', 'dm', 'mtt')."""
    uses_experts: bool
    """True if the objective reads expert trajectories."""
    learns_lr: bool
    """True if the objective returns a gradient for a learnable step size."""

    def image_grad(
        self,
        images: Tensor,
        labels: Tensor,
        syn_lr: Tensor | None,
        rng: torch.Generator,
        iteration: int = 0,
    ) -> ObjectiveOutput:
        """Loss and d loss / d images for detached normalised images [N,C,H,W], labels [N] at
        distillation step `iteration` (objectives with a schedule read it)."""
        ...


def draw_seed(rng: torch.Generator) -> int:
    """One integer seed in [0, SEED_HIGH) from the CPU generator `rng`."""
    return int(torch.randint(0, SEED_HIGH, (1,), generator=rng).item())


def class_indices(labels: Tensor) -> list[tuple[int, Tensor]]:
    """(class, indices into labels [N]) for each class present, in increasing class order."""
    return [(int(c), torch.nonzero(labels == c).flatten()) for c in torch.unique(labels)]


def matching_mode(net: nn.Module) -> nn.Module:
    """Put `net` in the mode used for matching: eval, except BatchNorm (batch statistics).

    Per-sample norms (instance/group/layer) behave the same in both modes; BatchNorm keeps the
    research code's train-mode batch statistics; dropout is off, so matching is deterministic
    and never touches the global RNG.
    """
    net.eval()
    for module in net.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            module.train()
    return net


def seeded_network(
    arch: str,
    channels: int,
    num_classes: int,
    res: int,
    seed: int,
    overrides: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A network initialised from `seed` (global RNG state restored), in matching mode."""
    net = build_seeded_network(arch, channels, num_classes, res, seed, **dict(overrides or {}))
    return matching_mode(net)


def siamese(aug: DiffAugment | None, x: Tensor, seed: int) -> Tensor:
    """x [B,C,H,W] augmented with the one-draw-per-batch DSA of `seed` (x itself if no aug)."""
    return x if aug is None else aug(x, seed=seed)


def make_augment(enabled: bool, strategy: str) -> DiffAugment | None:
    """DiffAugment for `strategy` when enabled (validates the strategy), else None."""
    return DiffAugment(strategy) if enabled else None


class FreshNetworkObjective:
    """Base of objectives that match on a freshly initialised random network per call (DC, DM)."""

    uses_experts = False
    learns_lr = False

    def __init__(
        self,
        cfg: DistillConfig,
        data: RealDataset,
        num_classes: int,
        channels: int,
        res: int,
        experts: object | None = None,
        *,
        net_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        """Match on `cfg.arch` for [B, channels, res, res] images (`experts` is ignored)."""
        if cfg.batch_real < 1:
            raise ConfigError(
                f"distill.batch_real must be >= 1, got {cfg.batch_real}; set it to 256"
            )
        self.cfg, self.data = cfg, data
        self.net_spec = (cfg.arch, channels, num_classes, res)
        self.net_overrides = dict(net_overrides or {})
        self.aug = make_augment(cfg.dsa, cfg.dsa_strategy)
        seeded_network(*self.net_spec, seed=0, overrides=self.net_overrides)  # fail early

    def fresh_network(self, rng: torch.Generator, like: Tensor) -> nn.Module:
        """A network initialised from a seed drawn from `rng`, on `like`'s device and dtype."""
        net = seeded_network(*self.net_spec, seed=draw_seed(rng), overrides=self.net_overrides)
        return net.to(device=like.device, dtype=like.dtype)

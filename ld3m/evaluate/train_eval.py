"""Train a fresh network on a synthetic set, test it once at the end on the real test split.

This is the protocol every ld3m result goes through (ld3m-method notes, section 9): SGD with
momentum and weight decay, LD3M's warm-up + cosine schedule or DC/MTT's step schedule, optional
EMA of the weights (tested instead of the raw network), DSA on every training batch. The final
network is reported; nothing is selected by test accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ld3m.config.schema import EvalConfig
from ld3m.data.augment import DiffAugment
from ld3m.errors import TrainingError
from ld3m.models.networks import build_network
from ld3m.utils.progress import ProgressMode, progress

LD3M_LR = {"VGG11": 1e-4}
"""LD3M/GLaD's fixed evaluation learning rates; architectures not listed use `LD3M_DEFAULT_LR`."""
LD3M_DEFAULT_LR = 1e-3


@dataclass(frozen=True)
class TrainData:
    """Tensors for one evaluation: synthetic train set and real test set (normalised)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def res(self) -> int:
        return int(self.train_images.shape[-1])


@dataclass(frozen=True)
class RunResult:
    """Outcome of one trained network."""

    acc: float
    train_acc: float
    lr: float
    wall_s: float


def at_ipc(cfg: EvalConfig, ipc: int) -> EvalConfig:
    """The protocol for a set of `ipc` images per class: `ipc_arch_lr[ipc]` over `arch_lr`."""
    return replace(cfg, arch_lr={**cfg.arch_lr, **cfg.ipc_arch_lr.get(ipc, {})}, ipc_arch_lr={})


def resolve_lr(cfg: EvalConfig, arch: str, learned_lr: float | None) -> float:
    """The learning rate for `arch`: learned (if asked and present), configured for the
    architecture, configured, or LD3M's table."""
    if cfg.learned_lr and learned_lr is not None:
        return float(learned_lr)
    if arch in cfg.arch_lr:
        return cfg.arch_lr[arch]
    if cfg.lr is not None:
        return cfg.lr
    return LD3M_LR.get(arch, LD3M_DEFAULT_LR)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: EvalConfig) -> LRScheduler:
    """Per-epoch schedule: warm-up from 1e-7x over the first half then cosine, or x0.1 at half."""
    half = max(cfg.epochs // 2, 1)
    if cfg.schedule == "step":
        return MultiStepLR(optimizer, milestones=[half], gamma=0.1)
    warmup = LinearLR(optimizer, start_factor=1e-7, end_factor=1.0, total_iters=half)
    cosine = CosineAnnealingLR(optimizer, T_max=max(cfg.epochs - half, 1))
    return SequentialLR(optimizer, [warmup, cosine], milestones=[half])


def train_and_test(
    arch: str,
    data: TrainData,
    cfg: EvalConfig,
    lr: float,
    seed: int,
    progress_mode: ProgressMode = "off",
    labels: Labels | None = None,
) -> RunResult:
    """Train a fresh `arch` on the synthetic set with run seed `seed`; test it once at the end.
    `labels` picks the training loss (hard labels by default; a teacher's or projector's)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = build_network(arch, data.channels, data.num_classes, data.res)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = make_scheduler(optimizer, cfg)
    ema = None
    if cfg.ema_decay is not None:
        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    augment = DiffAugment(cfg.dsa_strategy if cfg.dsa else "none")
    loss_fn = labels or Labels()
    net.train()
    for _ in progress(range(cfg.epochs), progress_mode, desc=f"{arch} seed {seed}"):
        train_epoch(net, optimizer, data, cfg.batch_train, augment, gen, ema, loss_fn)
        scheduler.step()
    final = ema.module if ema is not None else net
    train_acc = accuracy(final, data.train_images, data.train_labels, cfg.batch_test)
    acc = accuracy(final, data.test_images, data.test_labels, cfg.batch_test)
    return RunResult(acc=acc, train_acc=train_acc, lr=lr, wall_s=time.perf_counter() - start)


@dataclass(frozen=True)
class Labels:
    """The training loss on an augmented batch: cross-entropy on the set's hard labels; with a
    teacher SRe2L's T^2 KL(softmax(teacher(x)/T) || softmax(net(x)/T)); with a projector
    HeLlO's MSE(net(x), projector(x)) + ce_weight CE(net(x), y)."""

    teacher: nn.Module | None = None
    temperature: float = 3.0
    projector: nn.Module | None = None
    ce_weight: float = 1.0

    def __call__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = net(x)
        if self.projector is not None:
            with torch.no_grad():
                target = self.projector(x)
            return F.mse_loss(logits, target) + self.ce_weight * F.cross_entropy(logits, y)
        if self.teacher is None:
            return F.cross_entropy(logits, y)
        t = self.temperature
        with torch.no_grad():
            soft = F.softmax(self.teacher(x) / t, dim=1)
        return F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean") * t * t


def train_epoch(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainData,
    batch: int,
    augment: DiffAugment,
    gen: torch.Generator,
    ema: AveragedModel | None,
    loss_fn: Labels,
) -> None:
    """One pass over the synthetic set in shuffled minibatches, DSA drawn per sample."""
    order = torch.randperm(len(data.train_labels), generator=gen)
    for idx in order.split(batch):
        x = augment(data.train_images[idx], generator=gen)
        loss = loss_fn(net, x, data.train_labels[idx])
        if not torch.isfinite(loss):
            raise TrainingError(
                f"evaluation loss became {loss.item()}; lower eval.lr or check the synthetic set"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(net)


@torch.inference_mode()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    """Top-1 accuracy of `net` (in eval mode) on normalised `images` [N,C,H,W]."""
    was_training = net.training
    net.eval()
    correct = 0
    for x, y in zip(images.split(batch), labels.split(batch), strict=True):
        correct += int((net(x).argmax(dim=1) == y).sum())
    net.train(was_training)
    return correct / max(len(labels), 1)

"""MTT: trajectory matching in TESLA's constant-memory form (method notes 6.3 and 6.4).

A student starts at expert snapshot theta_0 = snap[start] and takes N = syn_steps SGD steps of
size alpha on synthetic minibatches; the loss is |theta_N - theta*|^2 / |theta_0 - theta*|^2
with theta* = snap[start + expert_epochs].

TESLA estimator (default): pass 1 unrolls without a graph, keeping theta_i; with G = sum g_i,
L = |theta_0 - alpha G - theta*|^2 / D and v = dL/dG; pass 2 recomputes each g_i with
`create_graph` and adds d(v . g_i)/dX[b_i]. Activation memory does not grow with N (only the
N parameter vectors theta_i do). It drops the dependence of later g_j on X through theta_j:
exact for N = 1, a first-order approximation beyond. This is the TRUE gradient of that
estimator: the released TESLA/LD3M code halves it by a slip (notes 6.4), so halve the image
learning rate to reproduce their runs. alpha's gradient is dL/dalpha with G held constant.

`estimator="unroll"` differentiates through all N steps (original MTT, memory linear in N).

Per-sample DSA draws: each step gets a seed from `rng`; the recompute replays the same draws
(from a fresh generator with that seed), so the augmented minibatch need not be stored.
Draws from `rng`, in order: the start epoch, then per step: a permutation of the synthetic set
whenever the previous one is used up, and the step's DSA seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ld3m.config.schema import DistillConfig, MTTConfig
from ld3m.data.augment import DiffAugment
from ld3m.data.datasets import RealDataset
from ld3m.distill.objectives.base import ObjectiveOutput, draw_seed, make_augment, seeded_network
from ld3m.errors import ConfigError
from ld3m.models.functional import functional_forward

Estimator = Literal["tesla", "unroll"]


class Trajectory(Protocol):
    """One expert trajectory: float32 flat parameter vectors [E+1, P] (init + each epoch)."""

    snapshots: Tensor


class ExpertSource(Protocol):
    """Yields expert trajectories (e.g. `ld3m.experts.sampler.ExpertSampler`)."""

    def next(self) -> Trajectory:
        """The next trajectory."""
        ...


@dataclass(frozen=True)
class StudentPlan:
    """The random choices of one MTT evaluation."""

    start: int
    """Start epoch of the expert trajectory."""
    batches: tuple[Tensor, ...]
    """Per student step: int64 indices into the synthetic set."""
    aug_seeds: tuple[int, ...]
    """Per student step: seed of the per-sample DSA draws."""


def draw_plan(rng: torch.Generator, n: int, cfg: MTTConfig) -> StudentPlan:
    """Start epoch, minibatches (chunks of random permutations) and DSA seeds from `rng`."""
    start = int(torch.randint(0, cfg.max_start_epoch, (1,), generator=rng).item())
    size = min(cfg.batch_syn, n) if cfg.batch_syn > 0 else n
    chunks: list[Tensor] = []
    batches, seeds = [], []
    for _ in range(cfg.syn_steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=rng).split(size))
        batches.append(chunks.pop(0))
        seeds.append(draw_seed(rng))
    return StudentPlan(start, tuple(batches), tuple(seeds))


def check_mtt_config(cfg: MTTConfig) -> None:
    """Raise ConfigError for MTT settings that cannot work."""
    for key in ("syn_steps", "expert_epochs", "max_start_epoch"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"distill.mtt.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.batch_syn < 0:
        raise ConfigError(f"distill.mtt.batch_syn must be >= 0 (0 = all), got {cfg.batch_syn}")


@dataclass
class Student:
    """The student network as a function of flat parameters, on the synthetic set."""

    net: nn.Module
    aug: DiffAugment | None
    labels: Tensor

    def loss(self, theta: Tensor, x: Tensor, batch: Tensor, seed: int) -> Tensor:
        """CE of student theta [P] on DSA(x) [b,C,H,W] (draws from `seed`), labels[batch]."""
        if self.aug is not None:
            x = self.aug(x, generator=torch.Generator().manual_seed(seed))
        return F.cross_entropy(functional_forward(self.net, theta, x), self.labels[batch])

    def step_grad(
        self, theta: Tensor, x: Tensor, batch: Tensor, seed: int, create_graph: bool = False
    ) -> Tensor:
        """d CE / d theta [P] at leaf-or-graph theta [P] on minibatch x."""
        return torch.autograd.grad(
            self.loss(theta, x, batch, seed), theta, create_graph=create_graph
        )[0]


def tesla(
    student: Student,
    images: Tensor,
    theta0: Tensor,
    target: Tensor,
    alpha: Tensor,
    plan: StudentPlan,
) -> tuple[Tensor, Tensor, Tensor]:
    """TESLA: (loss, d loss/d images [N,C,H,W], d loss/d alpha) in memory constant in steps."""
    thetas = theta0.new_empty(len(plan.batches), theta0.numel())  # one block: no fragmentation
    theta, total = theta0, torch.zeros_like(theta0)
    for i, (batch, seed) in enumerate(zip(plan.batches, plan.aug_seeds, strict=True)):
        thetas[i] = theta
        leaf = theta.detach().requires_grad_(True)
        g = student.step_grad(leaf, images[batch].detach(), batch, seed)
        total += g
        theta = theta - alpha * g
    dist0 = (theta0 - target).square().sum()
    end = theta0 - alpha * total - target
    loss = end.square().sum() / dist0
    v = (-2.0 * alpha / dist0) * end  # dL/dG = (2/D)(alpha^2 G + alpha (theta* - theta_0))
    lr_grad = (-2.0 / dist0) * torch.dot(total, end)
    grad = torch.zeros_like(images)
    for theta_i, batch, seed in zip(thetas, plan.batches, plan.aug_seeds, strict=True):
        x = images[batch].detach().requires_grad_(True)
        g = student.step_grad(theta_i.detach().requires_grad_(True), x, batch, seed, True)
        grad.index_add_(0, batch, torch.autograd.grad(torch.dot(g, v), x)[0])
    return loss, grad, lr_grad


def unroll(
    student: Student,
    images: Tensor,
    theta0: Tensor,
    target: Tensor,
    alpha: Tensor,
    plan: StudentPlan,
) -> tuple[Tensor, Tensor, Tensor]:
    """Full unroll: exact (loss, d loss/d images, d loss/d alpha), memory linear in steps."""
    x_all = images.detach().requires_grad_(True)
    a = alpha.detach().clone().requires_grad_(True)
    theta = theta0.detach().requires_grad_(True)
    for batch, seed in zip(plan.batches, plan.aug_seeds, strict=True):
        theta = theta - a * student.step_grad(theta, x_all[batch], batch, seed, True)
    loss = (theta - target).square().sum() / (theta0 - target).square().sum()
    grad, lr_grad = torch.autograd.grad(loss, (x_all, a))
    return loss.detach(), grad, lr_grad


ESTIMATORS = MappingProxyType({"tesla": tesla, "unroll": unroll})


class TrajectoryMatching:
    """MTT on expert trajectories, TESLA estimator by default; learns the student step size."""

    name = "mtt"
    uses_experts = True
    learns_lr = True

    def __init__(
        self,
        cfg: DistillConfig,
        data: RealDataset | None,
        num_classes: int,
        channels: int,
        res: int,
        experts: ExpertSource | None = None,
        *,
        net_overrides: Mapping[str, Any] | None = None,
        estimator: Estimator = "tesla",
    ) -> None:
        """Match trajectories of `cfg.arch` experts for [B, channels, res, res] images."""
        if experts is None:
            raise ConfigError(
                "objective 'mtt' needs expert trajectories; train them with `ld3m experts` "
                "and set experts.dir"
            )
        if estimator not in ESTIMATORS:
            raise ConfigError(f"unknown MTT estimator {estimator!r}; use 'tesla' or 'unroll'")
        check_mtt_config(cfg.mtt)
        self.cfg, self.experts, self.estimator = cfg, experts, estimator
        self.net = seeded_network(cfg.arch, channels, num_classes, res, 0, net_overrides)
        self.num_params = sum(p.numel() for p in self.net.parameters())
        self.where = f"{cfg.arch} for {channels}x{res}x{res} images, {num_classes} classes"
        self.aug = make_augment(cfg.dsa, cfg.dsa_strategy)

    def endpoints(self, snapshots: Tensor, start: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(theta_0, theta*) [P] from snapshots [E+1, P], on like's device and dtype."""
        epochs, need = snapshots.shape[0] - 1, self.cfg.mtt.max_start_epoch - 1
        need += self.cfg.mtt.expert_epochs
        if epochs < need:
            raise ConfigError(
                f"expert trajectory has {epochs} epochs but MTT reads epoch {need} "
                f"(max_start_epoch - 1 + expert_epochs; notes issue #4); train experts for "
                f">= {need} epochs or lower distill.mtt.max_start_epoch / expert_epochs"
            )
        if snapshots.ndim != 2 or snapshots.shape[1] != self.num_params:
            raise ConfigError(
                f"expert snapshots are {tuple(snapshots.shape)} but {self.where} has "
                f"{self.num_params} parameters; train experts with distill.arch's network"
            )
        pick = snapshots[[start, start + self.cfg.mtt.expert_epochs]]
        theta0, target = pick.to(device=like.device, dtype=like.dtype).unbind(0)
        return theta0, target

    def image_grad(
        self, images: Tensor, labels: Tensor, syn_lr: Tensor | None, rng: torch.Generator
    ) -> ObjectiveOutput:
        """Trajectory-matching loss, its image gradient [N,C,H,W] and its syn_lr gradient.

        syn_lr None uses `mtt.lr_init` and returns no lr_grad.
        """
        snapshots = self.experts.next().snapshots
        plan = draw_plan(rng, images.shape[0], self.cfg.mtt)
        theta0, target = self.endpoints(snapshots, plan.start, images)
        lr = self.cfg.mtt.lr_init if syn_lr is None else syn_lr.detach()
        alpha = torch.as_tensor(lr, dtype=images.dtype, device=images.device).reshape(())
        self.net.to(device=images.device, dtype=images.dtype)
        student = Student(self.net, self.aug, labels.to(images.device))
        with torch.enable_grad():
            loss, grad, lr_grad = ESTIMATORS[self.estimator](
                student, images, theta0, target, alpha, plan
            )
        stats = {
            "start_epoch": float(plan.start),
            "syn_lr": float(alpha),
            "start_dist": float((theta0 - target).square().sum()),
        }
        out_lr = None if syn_lr is None else lr_grad.detach().reshape(syn_lr.shape).to(syn_lr)
        return ObjectiveOutput(float(loss), grad.detach(), out_lr, stats)

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

import math
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
    if not 0.0 <= cfg.student_momentum < 1.0:
        raise ConfigError(f"distill.mtt.student_momentum must be in [0, 1) (AST: 0.9), got "
                          f"{cfg.student_momentum}")  # fmt: skip
    if cfg.perturb < 0:
        raise ConfigError(f"distill.mtt.perturb must be >= 0 (AST: 1, 0 = off), got {cfg.perturb}")


@dataclass
class Student:
    """The student network as a function of flat parameters, on the synthetic set."""

    net: nn.Module
    aug: DiffAugment | None
    labels: Tensor
    scale: float = 1.0
    """Factor on the student's CE (AST's balanced inner loss; 1 otherwise)."""

    def loss(self, theta: Tensor, x: Tensor, batch: Tensor, seed: int) -> Tensor:
        """CE of student theta [P] on DSA(x) [b,C,H,W] (draws from `seed`), labels[batch]."""
        if self.aug is not None:
            x = self.aug(x, generator=torch.Generator().manual_seed(seed))
        ce = F.cross_entropy(functional_forward(self.net, theta, x), self.labels[batch])
        return ce * self.scale

    def step_grad(
        self, theta: Tensor, x: Tensor, batch: Tensor, seed: int, create_graph: bool = False
    ) -> Tensor:
        """d CE / d theta [P] at leaf-or-graph theta [P] on minibatch x."""
        return torch.autograd.grad(
            self.loss(theta, x, batch, seed), theta, create_graph=create_graph
        )[0]


@dataclass(frozen=True)
class Match:
    """One matched point: the student after `step` steps against expert parameters `target`,
    loss weight `weight` / |theta_0 - target|^2."""

    step: int
    target: Tensor
    weight: float = 1.0


def momentum_coef(mu: float, n: int, j: int) -> float:
    """c_j^(n) = (1 - mu^(n-j)) / (1 - mu): weight of g_j in theta_n = theta_0 - alpha sum c g."""
    return 1.0 if mu == 0.0 else (1 - mu ** (n - j)) / (1 - mu)


def tesla(
    student: Student,
    images: Tensor,
    theta0: Tensor,
    matches: tuple[Match, ...],
    alpha: Tensor,
    plan: StudentPlan,
    mu: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """TESLA: (loss, d loss/d images [N,C,H,W], d loss/d alpha) in memory constant in steps.

    With momentum mu, theta_n = theta_0 - alpha sum_{j<n} c_j^(n) g_j (c from
    `momentum_coef`); for each match k (step n_k, residual r_k, normaliser D_k) the images get
    d(v_j . g_j)/dX with v_j = -alpha sum_{k: n_k > j} (2 w_k / D_k) c_j^(n_k) r_k, and alpha
    gets -sum_k (2 w_k / D_k) r_k . G_k with G_k = sum_{j<n_k} c_j^(n_k) g_j (seed-methods
    notes, AST's TESLA form). mu = 0 with one final match is the original estimator.
    """
    steps = len(plan.batches)
    thetas = theta0.new_empty(steps, theta0.numel())  # one block: no fragmentation
    theta, buf, total = theta0, torch.zeros_like(theta0), torch.zeros_like(theta0)
    matched = {m.step for m in matches}
    at_step = {}  # matched step -> G (sum of the momentum buffers applied so far)
    for i, (batch, seed) in enumerate(zip(plan.batches, plan.aug_seeds, strict=True)):
        thetas[i] = theta
        leaf = theta.detach().requires_grad_(True)
        g = student.step_grad(leaf, images[batch].detach(), batch, seed)
        buf = mu * buf + g if mu else g
        total += buf
        theta = theta - alpha * buf
        if i + 1 in matched:
            at_step[i + 1] = total.clone()
    loss = theta0.new_zeros(())
    lr_grad = theta0.new_zeros(())
    coefs = []  # (step n_k, 2 w_k / D_k, r_k)
    for m in matches:
        G = at_step[m.step]
        dist0 = (theta0 - m.target).square().sum()
        r = theta0 - alpha * G - m.target
        loss = loss + m.weight * r.square().sum() / dist0
        lr_grad = lr_grad - (2.0 * m.weight / dist0) * torch.dot(G, r)
        coefs.append((m.step, 2.0 * m.weight / dist0, r))
    grad = torch.zeros_like(images)
    for j, (theta_j, batch, seed) in enumerate(
        zip(thetas, plan.batches, plan.aug_seeds, strict=True)
    ):
        v = sum(-alpha * w * momentum_coef(mu, n, j) * r for n, w, r in coefs if n > j)
        if not torch.is_tensor(v):
            continue  # no match after this step
        x = images[batch].detach().requires_grad_(True)
        g = student.step_grad(theta_j.detach().requires_grad_(True), x, batch, seed, True)
        grad.index_add_(0, batch, torch.autograd.grad(torch.dot(g, v), x)[0])
    return loss, grad, lr_grad


def unroll(
    student: Student,
    images: Tensor,
    theta0: Tensor,
    matches: tuple[Match, ...],
    alpha: Tensor,
    plan: StudentPlan,
    mu: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Full unroll: exact (loss, d loss/d images, d loss/d alpha), memory linear in steps."""
    x_all = images.detach().requires_grad_(True)
    a = alpha.detach().clone().requires_grad_(True)
    theta = theta0.detach().requires_grad_(True)
    buf = torch.zeros_like(theta0)
    loss = theta0.new_zeros(())
    for i, (batch, seed) in enumerate(zip(plan.batches, plan.aug_seeds, strict=True)):
        g = student.step_grad(theta, x_all[batch], batch, seed, True)
        buf = mu * buf + g if mu else g
        theta = theta - a * buf
        for m in matches:
            if m.step == i + 1:
                dist0 = (theta0 - m.target).square().sum()
                loss = loss + m.weight * (theta - m.target).square().sum() / dist0
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

    def endpoints(self, snapshots: Tensor, start: int, like: Tensor) -> Tensor:
        """Expert epochs start .. start + expert_epochs [M+1, P] from snapshots [E+1, P], on
        like's device and dtype."""
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
        pick = snapshots[start : start + self.cfg.mtt.expert_epochs + 1]
        return pick.to(device=like.device, dtype=like.dtype)

    def matches(self, epochs: Tensor) -> tuple[Match, ...]:
        """The matched points: the final one (N steps -> epoch start + M) and, with AST's
        intermediate matching, floor(N/M) i steps -> epoch start + i for i = 1 .. M-1."""
        m = self.cfg.mtt
        final = Match(m.syn_steps, epochs[-1])
        if m.intermediate == "off":
            return (final,)
        M, every = m.expert_epochs, m.syn_steps // m.expert_epochs
        weight = (lambda i: 1.0) if m.intermediate == "equal" else (lambda i: i / M)
        middle = tuple(Match(every * i, epochs[i], weight(i)) for i in range(1, M) if every * i)
        return (*middle, final)

    def ce_scale(self, start: int) -> float:
        """AST's balanced inner loss factor for start epoch `start` (1 when off)."""
        if not self.cfg.mtt.balanced_loss:
            return 1.0
        h = self.cfg.mtt.max_start_epoch // 2
        return math.log(start - h + 8, 5) if start >= h else 1.0 / math.log(h - start + 8, 5)

    def perturbed(self, theta0: Tensor, rng: torch.Generator) -> Tensor:
        """AST's weight perturbation of the start (theta0 itself when off): every conv weight
        W + perturb (d/|d|_F) W, d ~ N(0, I) drawn from `rng` tensor by tensor."""
        if self.cfg.mtt.perturb == 0.0:
            return theta0
        out, offset = theta0.clone(), 0
        for p in self.net.parameters():
            n = p.numel()
            if p.ndim == 4:
                d = torch.randn(n, generator=rng, dtype=torch.float64).to(theta0)
                w = out[offset : offset + n]
                out[offset : offset + n] = w + self.cfg.mtt.perturb * (d / d.norm()) * w
            offset += n
        return out

    def image_grad(
        self,
        images: Tensor,
        labels: Tensor,
        syn_lr: Tensor | None,
        rng: torch.Generator,
        iteration: int = 0,
    ) -> ObjectiveOutput:
        """Trajectory-matching loss, its image gradient [N,C,H,W] and its syn_lr gradient.

        syn_lr None uses `mtt.lr_init` and returns no lr_grad.
        """
        snapshots = self.experts.next().snapshots
        plan = draw_plan(rng, images.shape[0], self.cfg.mtt)
        epochs = self.endpoints(snapshots, plan.start, images)
        theta0, matches = self.perturbed(epochs[0], rng), self.matches(epochs)
        lr = self.cfg.mtt.lr_init if syn_lr is None else syn_lr.detach()
        alpha = torch.as_tensor(lr, dtype=images.dtype, device=images.device).reshape(())
        self.net.to(device=images.device, dtype=images.dtype)
        student = Student(self.net, self.aug, labels.to(images.device), self.ce_scale(plan.start))
        with torch.enable_grad():
            loss, grad, lr_grad = ESTIMATORS[self.estimator](
                student, images, theta0, matches, alpha, plan, self.cfg.mtt.student_momentum
            )
        stats = {
            "start_epoch": float(plan.start),
            "syn_lr": float(alpha),
            "start_dist": float((theta0 - epochs[-1]).square().sum()),
        }
        out_lr = None if syn_lr is None else lr_grad.detach().reshape(syn_lr.shape).to(syn_lr)
        return ObjectiveOutput(float(loss), grad.detach(), out_lr, stats)

"""Train expert networks on the real data and record their trajectories (MTT's buffer.py).

An expert is a fresh network (initialised from its seed) trained with SGD (MTT: plain, constant
learning rate), batch `experts.batch`, DSA with per-sample draws, cross entropy, reshuffled every
epoch. Its trajectory is the flat parameter vector after init and after every epoch. AST's
smoother experts are options: momentum and weight decay, a step in the learning rate
(`lr_milestone`, `lr_gamma`), the clipping loss (CE scaled up from 0.5 over the first
`loss_scale_epochs`) and the input-gradient penalty (`grad_penalty`).

`experts.keep_epochs = K > 0` trains only K epochs: every schedule is a function of the epoch and
one random stream is consumed epoch by epoch, so snapshots 0..K are identical to those of a
longer run and the later epochs would be thrown away anyway (tested).

`ld3m experts --shard i/n` trains experts i, i+n, i+2n, ... (< experts.num) and writes them as
one shard; a complete shard is skipped, so a requeued or rerun array task does nothing twice.
While a shard trains, each expert checkpoints every epoch under `ckpt/shard_<i>_of_<n>/`, so a
preempted task resumes at its last finished epoch (removed once the shard is written).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ld3m.checkpoint import CheckpointManager
from ld3m.config.schema import Config, ExpertsConfig
from ld3m.data.augment import DEFAULT_STRATEGY, DiffAugment
from ld3m.data.datasets import DatasetInfo, RealDataset, load_dataset
from ld3m.errors import ConfigError, DataError, TrainingError
from ld3m.experts.store import ExpertSpec, ExpertStore, Trajectory
from ld3m.jsonl import append_jsonl
from ld3m.models.functional import flatten_params
from ld3m.models.networks import build_seeded_network
from ld3m.utils.progress import ProgressMode, progress

__all__ = [
    "Trajectory",
    "experts_main",
    "parse_shard",
    "shard_experts",
    "train_expert",
]

log = logging.getLogger(__name__)

TEST_BATCH = 500
JSONL_NAME = "experts.jsonl"
EXPERT_STATE = "state.pt"
CKPT_DIR = "ckpt"  # per shard, the epoch checkpoints of its experts while they train


def check_experts_config(cfg: ExpertsConfig) -> None:
    """Raise ConfigError for expert settings that cannot train."""
    for key in ("num", "epochs", "batch"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"experts.{key}={getattr(cfg, key)} must be at least 1")
    if cfg.keep_epochs < 0:
        raise ConfigError(f"experts.keep_epochs={cfg.keep_epochs} is negative; use 0 to keep all")
    if not cfg.lr > 0:
        raise ConfigError(f"experts.lr={cfg.lr} must be positive (MTT uses 0.01)")
    for key in ("lr_milestone", "loss_scale_epochs", "grad_penalty"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"experts.{key}={getattr(cfg, key)} must be >= 0 (0 = off)")


def trained_epochs(cfg: ExpertsConfig) -> int:
    """Epochs actually trained: experts.epochs, or keep_epochs when that is smaller and > 0."""
    return min(cfg.epochs, cfg.keep_epochs) if cfg.keep_epochs > 0 else cfg.epochs


def seeded_network(arch: str, info: DatasetInfo, seed: int) -> nn.Module:
    """A fresh `arch` for `info`'s images, initialised from torch.manual_seed(seed).

    The global RNG is forked, so the caller's random state is left untouched.
    """
    return build_seeded_network(arch, info.channels, info.num_classes, info.res, seed)


def expert_spec(arch: str, info: DatasetInfo) -> ExpertSpec:
    """The store spec (parameter layout) of `arch` experts on `info`'s dataset."""
    return ExpertSpec.from_network(arch, seeded_network(arch, info, 0), info)


def train_expert(
    data: RealDataset,
    cfg: ExpertsConfig,
    seed: int,
    progress_mode: ProgressMode = "auto",
    ckpt: Path | None = None,
) -> Trajectory:
    """Train one expert with seed `seed`; snapshots [trained_epochs + 1, P].

    With `ckpt`, the state after every epoch (network, optimizer, random stream, snapshots) is
    checkpointed there and training resumes from the newest checkpoint: a preempted expert
    loses at most one epoch, and the resumed trajectory equals an uninterrupted one.
    """
    check_experts_config(cfg)
    net = seeded_network(cfg.arch, data.info, seed)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    augment = DiffAugment(DEFAULT_STRATEGY if cfg.dsa else "none")
    settings = json.dumps({"experts": asdict(cfg), "seed": seed}, sort_keys=True)
    state = ExpertState(net, optimizer, gen, [flatten_params(net)], [], settings)
    checkpoints = CheckpointManager(ckpt) if ckpt is not None else None
    if checkpoints is not None and checkpoints.load_latest(state.load) is not None:
        log.info("expert seed %d resumes after epoch %d (%s)", seed, state.epoch, ckpt)
    epochs = trained_epochs(cfg)
    net.train()
    bar = progress(range(state.epoch + 1, epochs + 1), progress_mode, desc=f"expert seed {seed}")
    for epoch in bar:
        e = epoch - 1
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * (cfg.lr_gamma if 0 < cfg.lr_milestone <= e else 1.0)
        loss_fn = ExpertLoss(loss_scale(cfg, e), cfg.grad_penalty)
        _train_epoch(net, optimizer, data, cfg.batch, augment, gen, loss_fn,
                     f"seed {seed} epoch {epoch}")  # fmt: skip
        state.snapshots.append(flatten_params(net))
        state.accs.append(expert_accuracy(net, data))
        log.info("expert seed %d epoch %d/%d test_acc %.4f", seed, epoch, epochs, state.accs[-1])
        if checkpoints is not None and epoch < epochs:
            checkpoints.save(epoch, state.save)
    return Trajectory(torch.stack(state.snapshots), state.accs, cfg.arch, seed)


@dataclass
class ExpertState:
    """What an expert's training needs to continue after an epoch."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    gen: torch.Generator
    snapshots: list[Tensor]
    accs: list[float]
    settings: str  # the expert settings and seed (JSON): a checkpoint of others is not resumed

    @property
    def epoch(self) -> int:
        return len(self.accs)

    def save(self, folder: Path) -> None:
        state = {
            "net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "gen": self.gen.get_state(), "snapshots": torch.stack(self.snapshots),
            "accs": torch.tensor(self.accs, dtype=torch.float64), "settings": self.settings,
        }  # fmt: skip
        torch.save(state, folder / EXPERT_STATE)

    def load(self, folder: Path) -> int:
        state = torch.load(folder / EXPERT_STATE, map_location="cpu", weights_only=True)
        if state.get("settings", self.settings) != self.settings:  # older ones did not say
            raise ValueError("it was trained with other experts settings or another seed")
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["gen"])
        self.snapshots[:] = list(state["snapshots"])
        self.accs[:] = state["accs"].tolist()
        return self.epoch


def loss_scale(cfg: ExpertsConfig, epoch: int) -> float:
    """AST's clipping-loss factor of 0-based `epoch`: 0.5 + 0.5 e / K below K, then 1."""
    k = cfg.loss_scale_epochs
    return 0.5 + 0.5 * epoch / k if epoch < k else 1.0


@dataclass(frozen=True)
class ExpertLoss:
    """scale x CE on the augmented batch, plus AST's input-gradient penalty on the clean one."""

    scale: float = 1.0
    penalty: float = 0.0

    def __call__(self, net: nn.Module, x_aug: Tensor, x: Tensor, y: Tensor) -> Tensor:
        loss = self.scale * F.cross_entropy(net(x_aug), y)
        if self.penalty:
            loss = loss + self.penalty * input_grad_penalty(net, x)
        return loss


def input_grad_penalty(net: nn.Module, x: Tensor) -> Tensor:
    """mean over (b, h, w) of (|d sum_k f_k(x_b) / d x_b[:, h, w]|_2 - 1)^2 (a graph to net)."""
    x = x.detach().requires_grad_(True)
    g = torch.autograd.grad(net(x).sum(), x, create_graph=True)[0]
    return (g.norm(dim=1) - 1).square().mean()


def _train_epoch(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: RealDataset,
    batch: int,
    augment: DiffAugment,
    gen: torch.Generator,
    loss_fn: ExpertLoss,
    where: str,
) -> None:
    """One shuffled pass over the real train split (normalised per batch, DSA per sample)."""
    order = torch.randperm(len(data.train_labels), generator=gen)
    for idx in order.split(batch):
        clean = data.normalize(data.train_images[idx])
        loss = loss_fn(net, augment(clean, generator=gen), clean, data.train_labels[idx])
        if not torch.isfinite(loss):
            raise TrainingError(f"expert {where}: loss became {loss.item()}; lower experts.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.inference_mode()
def expert_accuracy(net: nn.Module, data: RealDataset, batch: int = TEST_BATCH) -> float:
    """Top-1 accuracy of `net` (in eval mode) on the real test split."""
    was_training = net.training
    net.eval()
    correct = 0
    for x, y in zip(data.test_images.split(batch), data.test_labels.split(batch), strict=True):
        correct += int((net(data.normalize(x)).argmax(dim=1) == y).sum())
    net.train(was_training)
    return correct / max(len(data.test_labels), 1)


# ---------------------------------------------------------------- command


def parse_shard(text: str) -> tuple[int, int]:
    """(i, n) from 'i/n', with 0 <= i < n."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise ConfigError(f"--shard {text!r} is not I/N; pass e.g. --shard 0/4 for shard 0 of 4")
    i, n = int(match[1]), int(match[2])
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= I < N (shards are numbered 0..N-1)")
    return i, n


def shard_experts(i: int, n: int, num: int) -> list[int]:
    """Expert ids of shard i of n when there are `num` experts: i, i+n, ... < num."""
    return list(range(i, num, n))


def experts_main(cfg: Config, shard: str) -> None:
    """`ld3m experts --shard I/N`: train this shard's experts unless it is complete, write it,
    log JSONL."""
    i, n = parse_shard(shard)
    path, trained = run_expert_shard(cfg, i, n)
    print(path if trained else f"shard {i}/{n} is already complete: {path}")


def run_expert_shard(cfg: Config, i: int, n: int) -> tuple[Path, bool]:
    """Train and write shard i of n of experts.dir unless it is complete: (its path, trained)."""
    ecfg = cfg.experts
    if not ecfg.dir:
        raise ConfigError("experts.dir is empty; set experts.dir=<buffer directory>")
    check_experts_config(ecfg)
    experts = shard_experts(i, n, ecfg.num)
    if not experts:
        raise ConfigError(
            f"shard {i}/{n} has no experts since experts.num={ecfg.num}; use at most "
            f"{ecfg.num} shards or raise experts.num"
        )
    store = ExpertStore(Path(ecfg.dir))
    if store.is_complete(i, n):
        _check_done(store, i, n, experts)
        store.rebuild_index()
        return store.shard_path(i, n), False
    data = load_dataset(cfg.data)
    spec = expert_spec(ecfg.arch, data.info)
    store.check_new_shard(spec, n)
    ckpt = store.root / CKPT_DIR / f"shard_{i}_of_{n}"
    trajectories = train_shard(data, ecfg, experts, cfg.run.progress, ckpt)
    config = {"experts": asdict(ecfg), "data": asdict(cfg.data)}
    path = store.write_shard(i, n, trajectories, spec, config)
    shutil.rmtree(ckpt, ignore_errors=True)  # the shard holds everything now
    _log_records(store.root / JSONL_NAME, trajectories, f"{i}/{n}")
    return path, True


def train_shard(
    data: RealDataset,
    cfg: ExpertsConfig,
    experts: Sequence[int],
    progress_mode: ProgressMode,
    ckpt: Path | None = None,
) -> list[Trajectory]:
    """Train experts `experts` (expert k with seed cfg.seed + k), in order; with `ckpt`, each
    checkpoints its epochs under `ckpt/expert_<k>/` (see `train_expert`)."""
    out = []
    for k in experts:
        log.info("training expert %d (%s, seed %d)", k, cfg.arch, cfg.seed + k)
        where = ckpt / f"expert_{k:05d}" if ckpt is not None else None
        traj = train_expert(data, cfg, cfg.seed + k, progress_mode, where)
        out.append(Trajectory(traj.snapshots, traj.test_acc, traj.arch, traj.seed, k))
    return out


def _check_done(store: ExpertStore, i: int, n: int, experts: list[int]) -> None:
    """DataError if the complete shard i/n holds other experts than this config asks for."""
    have = list(store.shard_meta(store.shard_path(i, n)).experts)
    if have != experts:
        raise DataError(
            f"{store.shard_path(i, n)} holds experts {have} but experts.num asks for {experts}; "
            "keep the experts.num it was trained with, or use a new experts.dir"
        )


def _log_records(path: Path, trajectories: Sequence[Trajectory], shard: str) -> None:
    """Append one JSON line per epoch per expert to the buffer's experts.jsonl."""
    for t in trajectories:
        for epoch, acc in enumerate(t.test_acc, 1):
            record = {"expert": t.expert, "epoch": epoch, "test_acc": acc, "seed": t.seed}
            append_jsonl(path, {**record, "arch": t.arch, "shard": shard})

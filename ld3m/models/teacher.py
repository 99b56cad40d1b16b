"""The BatchNorm teacher of SRe2L/CDA: trained by ld3m like an expert, loaded with its statistics.

A teacher is expert 0 of an expert buffer (`ld3m experts experts.arch=ConvNetBN experts.num=1`),
taken at its last epoch. The buffer keeps parameters only, so the BatchNorm running statistics
are recomputed on the real train split (train mode, cumulative average, clean images): the
population statistics of the final network, which the recover step matches and the soft-label
protocol evaluates with. That pass over the train split costs minutes on a CPU, so its result is
kept beside the buffer (`teacher_bn.safetensors`, stamped with the teacher's parameters and the
dataset) and reused by every later run and evaluation; a read-only buffer only costs the pass.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ld3m.data.datasets import DatasetInfo, RealDataset
from ld3m.errors import ConfigError
from ld3m.models.functional import load_flat
from ld3m.models.networks import build_network

if TYPE_CHECKING:
    from ld3m.experts.store import Trajectory

log = logging.getLogger(__name__)

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
STATS_FILE = "teacher_bn.safetensors"


def bn_layers(net: nn.Module) -> list[nn.Module]:
    """The network's BatchNorm layers, in definition order."""
    return [m for m in net.modules() if isinstance(m, BN_TYPES)]


def load_teacher(buffer: str | Path, data: RealDataset, batch: int = 500) -> nn.Module:
    """The frozen teacher (eval mode) of expert buffer `buffer`, BN statistics from `data`."""
    from ld3m.experts.sampler import first_expert

    if not str(buffer):
        raise ConfigError("the soft-label teacher needs an expert buffer: set experts.dir (or "
                          "eval.teacher) to one trained with experts.arch=ConvNetBN")  # fmt: skip
    traj = first_expert(buffer)
    net = expert_network(traj, data.info)
    cache = Path(buffer) / STATS_FILE
    stamp = stats_stamp(traj.snapshots[-1], data, batch)
    if not read_stats(net, cache, stamp):
        calibrate(net, data, batch, f"teacher {traj.arch} of {buffer}")
        write_stats(net, cache, stamp)
    return net.eval().requires_grad_(False)


def expert_network(traj: Trajectory, info: DatasetInfo) -> nn.Module:
    """The network of an expert's last snapshot (train mode, as built)."""
    net = build_network(traj.arch, info.channels, info.num_classes, info.res)
    return load_flat(net, traj.snapshots[-1])


def stats_stamp(params: torch.Tensor, data: RealDataset, batch: int) -> str:
    """What the BN statistics depend on: the teacher's parameters and the train split."""
    h = hashlib.sha256(repr((data.info, batch)).encode())
    for t in (params.detach().float(), data.train_images, data.train_labels):
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def bn_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every BN layer, by state-dict name."""
    return {f"{prefix}.{key}": buf
            for prefix, m in net.named_modules() if isinstance(m, BN_TYPES)
            for key, buf in m.named_buffers(recurse=False)}  # fmt: skip


def read_stats(net: nn.Module, path: Path, stamp: str) -> bool:
    """Load cached BN statistics into `net` when `path` holds ones of the same stamp."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("stamp") != stamp:
                return False
            cached = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except Exception as exc:  # a damaged cache is recomputed, never trusted
        log.warning("ignoring %s (%s); recomputing the teacher's BN statistics", path, exc)
        return False
    state = bn_state(net)
    if set(cached) != set(state):
        return False
    with torch.no_grad():
        for key, buf in state.items():
            buf.copy_(cached[key])
    return True


def write_stats(net: nn.Module, path: Path, stamp: str) -> None:
    """Keep the BN statistics beside the buffer (atomic; a read-only buffer is only logged)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in bn_state(net).items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"stamp": stamp})
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("could not keep the teacher's BN statistics in %s (%s)", path, exc)


@torch.no_grad()
def calibrate(net: nn.Module, data: RealDataset, batch: int, what: str) -> nn.Module:
    """Recompute every BN layer's running statistics over the real train split; frozen, eval."""
    layers = bn_layers(net)
    if not layers:
        raise ConfigError(f"{what} has no BatchNorm layers; train the teacher with "
                          "experts.arch=ConvNetBN or ResNet18BN")  # fmt: skip
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    net.train()
    images, _ = data.train_tensors()
    for x in images.split(batch):
        net(x)
    return net.eval().requires_grad_(False)

"""The BatchNorm teacher of SRe2L/CDA: trained by ld3m like an expert, loaded with its statistics.

A teacher is expert 0 of an expert buffer (`ld3m experts experts.arch=ConvNetBN experts.num=1`),
taken at its last epoch. The buffer keeps parameters only, so the BatchNorm running statistics
are recomputed on the real train split (train mode, cumulative average, clean images): the
population statistics of the final network, which the recover step matches and the soft-label
protocol evaluates with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ld3m.data.datasets import RealDataset
from ld3m.errors import ConfigError
from ld3m.models.functional import load_flat
from ld3m.models.networks import build_network

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


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
    info = data.info
    net = build_network(traj.arch, info.channels, info.num_classes, info.res)
    load_flat(net, traj.snapshots[-1])
    return calibrate(net, data, batch, f"teacher {traj.arch} of {buffer}")


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

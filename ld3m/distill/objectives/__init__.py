"""Matching objectives (DC, DCC, DM, MTT) and SRe2L's teacher inversion: image gradients for
the distillation loop.

`build_objective(cfg, data, ...)` returns a `MatchingObjective` whose
`image_grad(images, labels, syn_lr, rng)` gives the loss and d loss / d images; the loop
back-propagates that through the generator (two-phase scheme, method notes section 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ld3m.config.schema import DistillConfig
from ld3m.data.datasets import RealDataset
from ld3m.distill.objectives.base import MatchingObjective, ObjectiveOutput
from ld3m.distill.objectives.dc import (
    ContrastiveGradientMatching,
    GradientMatching,
    distance_wb,
)
from ld3m.distill.objectives.dm import DistributionMatching
from ld3m.distill.objectives.mtt import ExpertSource, Trajectory, TrajectoryMatching
from ld3m.distill.objectives.sre2l import BNInversion
from ld3m.errors import ConfigError

OBJECTIVES: Mapping[str, type] = MappingProxyType(
    {
        "dc": GradientMatching,
        "dcc": ContrastiveGradientMatching,
        "dm": DistributionMatching,
        "mtt": TrajectoryMatching,
        "sre2l": BNInversion,
    }
)


def build_objective(
    cfg: DistillConfig,
    data: RealDataset,
    num_classes: int,
    channels: int,
    res: int,
    experts: ExpertSource | None = None,
    **options: Any,
) -> MatchingObjective:
    """The objective `cfg.objective` for [B, channels, res, res] images of `num_classes` classes.

    `options` go to the objective's constructor (e.g. `net_overrides={"width": 16}` for tests,
    `estimator="unroll"` for MTT).
    """
    cls = OBJECTIVES.get(cfg.objective)
    if cls is None:
        raise ConfigError(
            f"unknown distill.objective {cfg.objective!r}; choose one of: {', '.join(OBJECTIVES)}"
        )
    return cls(cfg, data, num_classes, channels, res, experts, **options)


__all__ = [
    "OBJECTIVES",
    "BNInversion",
    "ContrastiveGradientMatching",
    "DistributionMatching",
    "ExpertSource",
    "GradientMatching",
    "MatchingObjective",
    "ObjectiveOutput",
    "Trajectory",
    "TrajectoryMatching",
    "build_objective",
    "distance_wb",
]

"""The trainable parts of `ld3m prior train`: KL autoencoder, class-conditional denoiser, their
EMA, optimisers and schedules, and the prior.json they produce."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ld3m.config.schema import PriorTrainConfig
from ld3m.data.datasets import DatasetInfo
from ld3m.errors import ConfigError
from ld3m.prior.architectures import build_unet, unet_config
from ld3m.prior.layout import PriorSpec

PART_KEYS = ("vae", "denoiser", "ema", "ae_opt", "unet_opt", "ae_sched", "unet_sched")


class Denoiser(nn.Module):
    """Epsilon model: UNet + learned class table [num_classes + 1, D] (last row = null class)."""

    def __init__(self, unet: nn.Module, num_classes: int, context_dim: int) -> None:
        super().__init__()
        self.unet = unet
        self.classes = nn.Embedding(num_classes + 1, context_dim)

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predicted noise [B, c, h, w] for noisy latents z, timesteps t [B], labels [B]."""
        return self.unet(z, t, encoder_hidden_states=self.classes(labels)[:, None]).sample


class AutoencoderLoss(nn.Module):
    """KL autoencoder training loss (a module, so that DDP sees the forward)."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """L1 + weighted KL; images x [B, C, H, W] in [-1, 1], posterior noise [B, c, h, w]."""
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.mean + posterior.std * noise).sample
        return F.l1_loss(recon, x) + self.kl_weight * posterior.kl().mean()


@dataclass
class Parts:
    """Everything a checkpoint holds."""

    vae: AutoencoderKL
    denoiser: Denoiser
    ema: AveragedModel
    ae_opt: torch.optim.Optimizer
    unet_opt: torch.optim.Optimizer
    ae_sched: LambdaLR
    unet_sched: LambdaLR
    step: int = 0
    scale_factor: float = 1.0

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loads with torch.load(weights_only=True))."""
        state = {key: getattr(self, key).state_dict() for key in PART_KEYS}
        state.update(step=self.step, scale_factor=self.scale_factor, rng=torch.get_rng_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output (strict)."""
        for key in PART_KEYS:
            getattr(self, key).load_state_dict(state[key])
        self.step, self.scale_factor = int(state["step"]), float(state["scale_factor"])
        torch.set_rng_state(state["rng"])


def factor(cfg: PriorTrainConfig) -> int:
    """Autoencoder downsampling factor."""
    return 2 ** (len(cfg.ae_channels) - 1)


def check_config(cfg: PriorTrainConfig, info: DatasetInfo) -> None:
    """Raise ConfigError when the sizes do not fit together."""
    f, res = factor(cfg), info.res
    if res % f:
        raise ConfigError(
            f"data.res={res} is not divisible by the autoencoder factor {f} "
            f"(prior_train.ae_channels); set data.res to a multiple of {f}"
        )
    down = 2 ** (len(cfg.unet_channels) - 1)
    if (res // f) % down:
        raise ConfigError(
            f"latent side {res // f} is not divisible by {down} (prior_train.unet_channels has "
            f"{len(cfg.unet_channels)} levels); change data.res or drop a UNet level"
        )
    if len(cfg.unet_attention) != len(cfg.unet_channels):
        raise ConfigError("prior_train.unet_attention needs one entry per unet_channels entry")
    widths = cfg.ae_channels + cfg.unet_channels
    if any(w % cfg.norm_groups for w in widths):
        raise ConfigError(f"prior_train.norm_groups={cfg.norm_groups} must divide {widths}")


def lr_factor(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""

    def fn(i: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * i / max(total, 1)))
        return min(1.0, (i + 1) / max(warmup, 1)) * cosine

    return fn


def build_parts(cfg: PriorTrainConfig, info: DatasetInfo) -> Parts:
    """Fresh models, optimisers and schedules (seeded by cfg.seed)."""
    torch.manual_seed(cfg.seed)
    n = len(cfg.ae_channels)
    vae = AutoencoderKL(
        in_channels=info.channels, out_channels=info.channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.ae_channels, layers_per_block=cfg.ae_layers,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_groups,
        sample_size=info.res, scaling_factor=1.0, mid_block_add_attention=False,
    )  # fmt: skip
    unet = build_unet(
        unet_config(
            cfg.unet_channels, cfg.unet_attention, cfg.context_dim, cfg.latent_channels,
            info.res // factor(cfg), cfg.unet_layers, cfg.norm_groups, cfg.heads,
        )
    )  # fmt: skip
    denoiser = Denoiser(unet, info.num_classes, cfg.context_dim)
    ema = AveragedModel(
        denoiser, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
    )
    ema.requires_grad_(False).eval()
    ae_opt = torch.optim.AdamW(vae.parameters(), lr=cfg.ae_lr)
    unet_opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.unet_lr)
    ae_sched = LambdaLR(ae_opt, lr_factor(cfg.warmup_steps, cfg.ae_steps))
    unet_sched = LambdaLR(unet_opt, lr_factor(cfg.warmup_steps, cfg.unet_steps))
    return Parts(vae, denoiser, ema, ae_opt, unet_opt, ae_sched, unet_sched)


def make_spec(cfg: PriorTrainConfig, info: DatasetInfo, scale: float, root: str) -> PriorSpec:
    """prior.json of the trained prior (schedule: PriorSpec's LDM defaults)."""
    return PriorSpec(
        num_classes=info.num_classes, null_class=info.num_classes, image_size=info.res,
        channels=info.channels, latent_channels=cfg.latent_channels,
        latent_size=info.res // factor(cfg), autoencoder="kl", scale_factor=scale,
        source=f"ld3m prior train: {info.name} {root}".strip(), class_names=info.class_names,
    )  # fmt: skip

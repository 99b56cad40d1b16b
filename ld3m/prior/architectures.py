"""diffusers configurations of the priors ld3m knows: CompVis cin256-v2 and small trainable ones.

cin256-v2 (configs/latent-diffusion/cin256-v2.yaml): UNet model_channels 192, channel_mult
[1,2,3,5], 2 res blocks, attention at downsampling factors 2, 4, 8 (levels 1-3), 1 head,
transformer depth 1, context 512; VQ-f4 first stage (ch 128, ch_mult [1,2,4], 8192 codes of
dimension 3); ClassEmbedder with 1001 rows (row 1000 = unconditional).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel, VQModel

from ld3m.prior.layout import PriorSpec


def unet_config(
    block_out_channels: tuple[int, ...],
    attention_levels: tuple[bool, ...],
    cross_attention_dim: int,
    latent_channels: int,
    sample_size: int,
    layers_per_block: int = 2,
    norm_num_groups: int = 32,
    heads: int = 1,
) -> dict[str, Any]:
    """UNet2DConditionModel kwargs for a CompVis-style class-conditional UNet."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    return {
        "sample_size": sample_size,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": heads,  # diffusers' legacy name: this is the number of heads
        "norm_num_groups": norm_num_groups,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": False,
    }


def vq_config(
    block_out_channels: tuple[int, ...],
    latent_channels: int,
    num_embeddings: int,
    sample_size: int,
    channels: int = 3,
    layers_per_block: int = 2,
    norm_num_groups: int = 32,
) -> dict[str, Any]:
    """VQModel kwargs for a taming-style VQ autoencoder (f = 2 ** (len(blocks) - 1))."""
    n = len(block_out_channels)
    return {
        "in_channels": channels,
        "out_channels": channels,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "num_vq_embeddings": num_embeddings,
        "vq_embed_dim": latent_channels,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": 1.0,
    }


CIN256_UNET = unet_config(
    block_out_channels=(192, 384, 576, 960),
    attention_levels=(False, True, True, True),
    cross_attention_dim=512,
    latent_channels=3,
    sample_size=64,
)
CIN256_VQ = vq_config(
    block_out_channels=(128, 256, 512), latent_channels=3, num_embeddings=8192, sample_size=256
)
CIN256_NUM_CLASSES = 1000
CIN256_CONTEXT_DIM = 512


def cin256_spec(source: str = "") -> PriorSpec:
    """prior.json contents of the converted cin256-v2 checkpoint."""
    return PriorSpec(
        num_classes=CIN256_NUM_CLASSES,
        null_class=CIN256_NUM_CLASSES,
        image_size=256,
        channels=3,
        latent_channels=3,
        latent_size=64,
        autoencoder="vq",
        scale_factor=1.0,
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        source=source,
    )


def build_unet(config: dict[str, Any], device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """Instantiate a UNet from kwargs (use device='meta' for shapes only)."""
    with torch.device(device):
        return UNet2DConditionModel(**config)


def build_vq(config: dict[str, Any], device: str | torch.device = "cpu") -> VQModel:
    """Instantiate a VQ autoencoder from kwargs (use device='meta' for shapes only)."""
    with torch.device(device):
        return VQModel(**config)

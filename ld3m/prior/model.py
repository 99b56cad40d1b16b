"""A frozen latent diffusion prior: autoencoder, class-conditional UNet, class embeddings, schedule.

`load_prior` reads a directory in the layout of `ld3m.prior.layout`; `save_prior` writes one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ld3m.errors import PriorLayoutError
from ld3m.prior import layout
from ld3m.prior.layout import PriorSpec

Autoencoder = VQModel | AutoencoderKL


@dataclass
class Prior:
    """A loaded prior. Images are in [-1, 1]; latents are scaled by `spec.scale_factor`."""

    spec: PriorSpec
    vae: Autoencoder
    unet: UNet2DConditionModel
    class_embeddings: torch.Tensor
    """[num_classes + 1, context_dim]; row `spec.null_class` is the unconditional embedding."""

    @property
    def context_dim(self) -> int:
        return int(self.class_embeddings.shape[1])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents [B, c, h, w] of images [B, C, H, W] in [-1, 1] (VQ: unquantised; KL: mean)."""
        if isinstance(self.vae, VQModel):
            z = self.vae.encode(images).latents
        else:
            z = self.vae.encode(images).latent_dist.mean
        return z * self.spec.scale_factor

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """VQ codebook lookup with a straight-through gradient (identity for a KL autoencoder)."""
        if not isinstance(self.vae, VQModel):
            return latents
        s = self.spec.scale_factor
        quantized, _, _ = self.vae.quantize(latents / s)
        return quantized * s

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in about [-1, 1] from latents (VQ: quantised, straight-through)."""
        z = latents / self.spec.scale_factor
        if isinstance(self.vae, VQModel):
            return self.vae.decode(z, force_not_quantize=False).sample
        return self.vae.decode(z).sample

    def embed(self, classes: torch.Tensor) -> torch.Tensor:
        """Cross-attention context [B, 1, D] for prior class indices [B]."""
        return self.class_embeddings[classes].unsqueeze(1)

    def null_context(self, batch: int) -> torch.Tensor:
        """Unconditional context [batch, 1, D]."""
        return self.class_embeddings[self.spec.null_class].expand(batch, 1, -1)

    def make_scheduler(self) -> DDIMScheduler:
        """DDIM with the prior's schedule; `leading` spacing + offset 1 gives LDM's timesteps."""
        return make_ddim(self.spec)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Prior:
        """Move every part to `device` (and `dtype`); returns self."""
        kwargs = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
        self.vae.to(**kwargs)
        self.unet.to(**kwargs)
        self.class_embeddings = self.class_embeddings.to(**kwargs)
        return self


def make_ddim(spec: PriorSpec) -> DDIMScheduler:
    """DDIM scheduler for `spec` (eta 0 is chosen at sampling time)."""
    return DDIMScheduler(
        num_train_timesteps=spec.num_train_timesteps,
        beta_start=spec.beta_start,
        beta_end=spec.beta_end,
        beta_schedule=spec.beta_schedule,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=spec.prediction_type,
    )


def freeze(prior: Prior) -> Prior:
    """Put every module in eval mode without gradients."""
    for module in (prior.vae, prior.unet):
        module.eval().requires_grad_(False)
    prior.class_embeddings = prior.class_embeddings.detach()
    return prior


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> Prior:
    """Load a prior directory, frozen (eval, no grad)."""
    root = Path(path).expanduser()
    spec = layout.validate_prior_dir(root)
    vae_cls = VQModel if spec.autoencoder == "vq" else AutoencoderKL
    try:
        vae = vae_cls.from_pretrained(root / layout.VAE_DIR)
        unet = UNet2DConditionModel.from_pretrained(root / layout.UNET_DIR)
        table = load_file(str(root / layout.EMBEDDINGS_FILE))[layout.EMBEDDINGS_KEY]
    except (OSError, ValueError, KeyError, SafetensorError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PriorLayoutError(f"prior {root} cannot be loaded ({first}); {layout.FIX}") from None
    check_consistent(root, spec, vae, unet, table)
    return freeze(Prior(spec, vae, unet, table)).to(device)


def check_consistent(
    root: Path, spec: PriorSpec, vae: Autoencoder, unet: UNet2DConditionModel, table: torch.Tensor
) -> None:
    """The parts must agree with each other and with prior.json."""
    problems = []
    if table.ndim != 2 or table.shape[0] != spec.num_classes + 1:
        problems.append(f"class table {tuple(table.shape)} needs {spec.num_classes + 1} rows")
    elif table.shape[1] != unet.config.cross_attention_dim:
        problems.append(
            f"class table width {table.shape[1]} != unet cross_attention_dim "
            f"{unet.config.cross_attention_dim}"
        )
    if vae.config.latent_channels != spec.latent_channels:
        problems.append(
            f"vae latent_channels {vae.config.latent_channels} != {spec.latent_channels}"
        )
    if unet.config.in_channels != spec.latent_channels:
        problems.append(f"unet in_channels {unet.config.in_channels} != {spec.latent_channels}")
    if problems:
        raise PriorLayoutError(f"prior {root} is inconsistent: {'; '.join(problems)}; {layout.FIX}")


def save_prior(
    root: str | Path,
    spec: PriorSpec,
    vae: Autoencoder,
    unet: UNet2DConditionModel,
    class_embeddings: torch.Tensor,
) -> Path:
    """Write a prior directory (weights as safetensors); prior.json is written last."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(root / layout.VAE_DIR, safe_serialization=True)
    unet.save_pretrained(root / layout.UNET_DIR, safe_serialization=True)
    table = class_embeddings.detach().float().cpu().contiguous()
    save_file({layout.EMBEDDINGS_KEY: table}, str(root / layout.EMBEDDINGS_FILE))
    layout.write_spec(root, spec)
    return root

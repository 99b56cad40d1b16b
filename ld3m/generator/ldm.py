"""The LD3M generator G(Z, c, eps): guided DDIM (eta 0) with the LD3M skip, then the VQ decoder.

Formulas follow the LD3M method notes (sections 2-3). With S = `cfg.steps`
timesteps tau_K > ... > tau_0 from the prior's DDIM scheduler (S = 10: 901, 801, ..., 1),
a_k = abar[tau_k], aprev_k = abar[tau_{k-1}] and aprev_0 = abar[0] (no "alpha to one"):

    z = sqrt(a_K) Z + sqrt(1 - a_K) eps                    # q_sample of the UNquantised Z
    for k = K..0:                                          # K = S - 1
        e  = e_u + s (e_c - e_u)                           # one UNet call on [z; z], [null; c]
        x0 = (z - sqrt(1 - a_k) e) / sqrt(a_k)
        released: x0 = (1 - k/K) x0 + (k/K) VQ_ST(Z)
        z  = sqrt(aprev_k) x0 + sqrt(1 - aprev_k) e
        paper:    z = (1 - (k+1)/S) z + ((k+1)/S) z_start  # z_start = the noised start state
    images = normalise(resize(clamp((decode(VQ_ST(z)) + 1) / 2, 0, 1)))

`none` is plain DDIM; `autoencoder` decodes Z directly. In `paper` mode the first step has
weight 1 (z stays z_start), so its UNet call is skipped: S - 1 calls. bf16 autocast (UNet and
decoder) is CUDA-only: CPU bf16 autocast is slow and untested here, so it raises ConfigError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ld3m.config.schema import GeneratorConfig
from ld3m.errors import ConfigError
from ld3m.prior.model import Prior


@dataclass(frozen=True)
class DdimStep:
    """One DDIM step: timestep, abar at it, abar at the previous (smaller) timestep, index k."""

    t: int
    alpha: float
    alpha_prev: float
    k: int


def ddim_schedule(prior: Prior, steps: int) -> tuple[DdimStep, ...]:
    """The S DDIM steps of `prior`, from the noisiest (k = S-1) to k = 0."""
    scheduler = prior.make_scheduler()
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.double()
    stride = scheduler.config.num_train_timesteps // steps
    out = []
    for i, t in enumerate(scheduler.timesteps.tolist()):
        prev = t - stride
        alpha_prev = float(abar[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        out.append(DdimStep(int(t), float(abar[t]), alpha_prev, steps - 1 - i))
    return tuple(out)


class LD3MGenerator:
    """G(Z, c, eps) -> images in the dataset normalisation, for a frozen prior."""

    def __init__(
        self,
        prior: Prior,
        cfg: GeneratorConfig,
        out_res: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        check_config(cfg, prior, mean, std)
        self.prior = prior
        self.cfg = cfg
        self.out_res = out_res
        self.schedule = ddim_schedule(prior, cfg.steps)
        self.mean = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self.probe_cache: dict[tuple[int, ...], Any] = {}
        """Memory probes of `ld3m.generator.backward`, one per latent shape."""

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Latent [c, h, w] that decodes to `out_res` pixels."""
        side = self.out_res // self.prior.spec.downsampling
        return (self.prior.spec.latent_channels, side, side)

    @property
    def unet_calls(self) -> int:
        """UNet calls per generation (each on a doubled batch when guidance != 1)."""
        return {"autoencoder": 0, "paper": self.cfg.steps - 1}.get(self.cfg.skip, self.cfg.steps)

    def generate(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        noise: torch.Tensor,
        checkpointing: bool = False,
        trace: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Images [N, C, out_res, out_res] (dataset-normalised) of Z [N,c,h,w], c [N,1,D], eps.

        `trace`, if given, receives the (mixed) x0 of every UNet step, detached.
        """
        if latents.shape != noise.shape or context.shape[0] != latents.shape[0]:
            raise ValueError(f"shapes {latents.shape}, {context.shape}, {noise.shape} disagree")
        z = latents
        if self.cfg.skip != "autoencoder":
            z = self.denoise(latents, context, noise, checkpointing, trace)
        return self.to_images(z)

    def denoise(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        noise: torch.Tensor,
        checkpointing: bool = False,
        trace: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The DDIM chain with the configured skip: latents z_0 [N, c, h, w]."""
        skip, steps = self.cfg.skip, self.cfg.steps
        top = self.schedule[0]
        z_start = math.sqrt(top.alpha) * latents + math.sqrt(1 - top.alpha) * noise
        quantized = self.prior.quantize(latents) if skip == "released" else None
        z = z_start
        for step in self.schedule:
            if skip == "paper" and step.k + 1 == steps:
                continue  # weight (k+1)/S = 1: z stays z_start
            e = self.eps(z, step.t, context, checkpointing)
            x0 = (z - math.sqrt(1 - step.alpha) * e) / math.sqrt(step.alpha)
            if quantized is not None:
                w = step.k / (steps - 1)
                x0 = (1 - w) * x0 + w * quantized
            if trace is not None:
                trace.append(x0.detach())
            z = math.sqrt(step.alpha_prev) * x0 + math.sqrt(1 - step.alpha_prev) * e
            if skip == "paper":
                w = (step.k + 1) / steps
                z = (1 - w) * z + w * z_start
        return z

    def eps(
        self, z: torch.Tensor, t: int, context: torch.Tensor, checkpointing: bool = False
    ) -> torch.Tensor:
        """Guided noise prediction [N, c, h, w]: one UNet call on [z; z] with [null; c]."""
        guidance = self.cfg.guidance
        if guidance != 1:
            null = self.prior.null_context(z.shape[0]).to(context)
            z, context = torch.cat([z, z]), torch.cat([null, context])
        call = partial(self._unet, t=t)
        if checkpointing and torch.is_grad_enabled():
            out = checkpoint(call, z, context, use_reentrant=False)
        else:
            out = call(z, context)
        if guidance == 1:
            return out
        e_u, e_c = out.chunk(2)
        return e_u + guidance * (e_c - e_u)

    def _unet(self, z: torch.Tensor, context: torch.Tensor, t: int) -> torch.Tensor:
        with self._autocast(z.device):
            return self.prior.unet(z, t, encoder_hidden_states=context).sample.to(z.dtype)

    def to_images(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents [N, c, h, w] (VQ_ST inside) to dataset-normalised images."""
        with self._autocast(z.device):
            x = self.prior.decode(z).to(z.dtype)
        x = ((x + 1) / 2).clamp(0, 1)
        if x.shape[-1] != self.out_res or x.shape[-2] != self.out_res:
            size = (self.out_res, self.out_res)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        mean, std = self.mean.to(x), self.std.to(x)
        return (x - mean) / std

    def render(
        self, latents: torch.Tensor, context: torch.Tensor, noise: torch.Tensor, chunk: int = 0
    ) -> torch.Tensor:
        """Images without gradients, `chunk` (default cfg.chunk) at a time."""
        chunk = chunk or self.cfg.chunk
        with torch.no_grad():
            parts = zip(latents.split(chunk), context.split(chunk), noise.split(chunk), strict=True)
            return torch.cat([self.generate(z, c, e) for z, c, e in parts])

    def _autocast(self, device: torch.device) -> torch.autocast:
        if self.cfg.bf16 and device.type != "cuda":
            raise ConfigError("generator.bf16=true needs a CUDA device; set generator.bf16=false")
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)


def check_config(
    cfg: GeneratorConfig, prior: Prior, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    """Reject generator settings that cannot work, with the fix."""
    if cfg.steps < 2 and cfg.skip in ("released", "paper"):
        raise ConfigError(f"generator.steps={cfg.steps}: the LD3M skip needs at least 2 steps")
    if cfg.steps < 1:
        raise ConfigError(f"generator.steps={cfg.steps} must be at least 1")
    if cfg.chunk < 1:
        raise ConfigError(f"generator.chunk={cfg.chunk} must be at least 1")
    if not len(mean) == len(std) == prior.spec.channels:
        raise ConfigError(
            f"normalisation mean/std have {len(mean)}/{len(std)} entries but the prior makes "
            f"{prior.spec.channels}-channel images; use a dataset with that many channels"
        )


def draw_noise(
    shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> torch.Tensor:
    """Standard normal noise of `shape`, reproducible across devices (drawn on CPU)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def encode_images(prior: Prior, images01: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Unquantised latents [N, c, h, w] of images [N, C, H, W] in [0, 1] (no gradients)."""
    with torch.no_grad():
        return torch.cat([prior.encode(x * 2 - 1) for x in images01.split(chunk)])


def class_context(prior: Prior, classes: torch.Tensor) -> torch.Tensor:
    """Context [N, 1, D]: a copy of the prior's embedding of each prior class index [N]."""
    return prior.embed(classes.to(prior.class_embeddings.device)).detach().clone()


def init_latents(
    prior: Prior,
    classes: torch.Tensor,
    images01: torch.Tensor | None = None,
    latent_size: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z, c): Z encoded from real images [N,C,H,W] in [0,1], or Gaussian when images01 is None."""
    context = class_context(prior, classes)
    if images01 is not None:
        latents = encode_images(prior, images01.to(context))
    elif latent_size > 0:
        shape = (len(classes), prior.spec.latent_channels, latent_size, latent_size)
        latents = draw_noise(shape, seed, context.dtype, str(context.device))
    else:
        raise ConfigError("Gaussian latent initialisation needs latent_size > 0")
    return latents, context

"""`ld3m prior train`: a small latent diffusion prior for any dataset of ld3m's data layer.

Stage 1: a KL autoencoder (L1 + tiny KL). Stage 2: the frozen autoencoder encodes the training set
once (posterior means, scaled to unit std); a class-conditional UNet learns epsilon on the prior's
DDPM schedule, context = one learned class token (null row for guidance, `label_dropout`). The EMA
of UNet + class table is saved. Randomness is a pure function of (seed, step, rank), so a run
resumed from a checkpoint repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ld3m.checkpoint import CheckpointManager, write_dir_atomic
from ld3m.config.io import load_config, save_config, to_dict
from ld3m.config.schema import Config, PriorTrainConfig
from ld3m.data.datasets import RealDataset, load_dataset
from ld3m.errors import ConfigError, TrainingError
from ld3m.paths import STATE_FILE, RunPaths
from ld3m.prior.model import Prior, save_prior
from ld3m.prior.parts import AutoencoderLoss, Parts, build_parts, check_config, factor, make_spec
from ld3m.prior.quality import measure_quality, sample_grid, to_pixels
from ld3m.tracking import Tracker, make_tracker, save_png
from ld3m.utils.progress import show_progress
from ld3m.utils.seeding import stream

log = logging.getLogger(__name__)

SHAPE_FIELDS = ("ae_channels", "ae_layers", "latent_channels", "unet_channels", "unet_attention")
SHAPE_FIELDS += ("unet_layers", "heads", "context_dim", "norm_groups", "seed")


def batch_indices(n: int, batch: int, step: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This process's share of the global batch of `step`: epochs of seeded permutations."""
    per_epoch = max(n // batch, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=stream(seed, epoch, 0, 0))
    return perm[pos * batch : (pos + 1) * batch][rank::world]


@dataclass
class Run:
    """One `ld3m prior train` invocation: config, data, parts and where things go."""

    cfg: Config
    paths: RunPaths
    acc: Accelerator
    data: RealDataset
    parts: Parts
    ckpt: CheckpointManager
    tracker: Tracker
    stop_after: int | None
    last_saved: int = -1

    @property
    def pt(self) -> PriorTrainConfig:
        return self.cfg.prior_train

    def batch(self, n: int, size: int, i: int) -> tuple[torch.Tensor, torch.Generator]:
        """(this process's indices of stage step i's batch, its noise generator)."""
        rank, world = self.acc.process_index, self.acc.num_processes
        return batch_indices(n, size, i, self.pt.seed, rank, world), stream(
            self.pt.seed, i, rank, 1
        )

    def save(self) -> None:
        """Checkpoint the current step (once per step; every process waits for it)."""
        if self.parts.step == self.last_saved:
            return
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = self.parts.state_dict()
            self.ckpt.save(self.parts.step, lambda d: torch.save(state, d / STATE_FILE))
        self.acc.wait_for_everyone()
        self.last_saved = self.parts.step

    def prior(self) -> Prior:
        """The current prior (EMA weights), in eval mode."""
        spec = make_spec(self.pt, self.data.info, self.parts.scale_factor, self.cfg.data.root)
        den = self.parts.ema.module
        return Prior(spec, self.parts.vae.eval(), den.unet, den.classes.weight.detach())

    def log_grid(self) -> torch.Tensor:
        """Log a sample grid (one row per class) of the EMA model; returns it."""
        pt = self.pt
        grid = sample_grid(self.prior(), pt.grid_per_class, pt.guidance, pt.sample_steps, pt.seed)
        self.tracker.images("samples", grid, self.parts.step, pt.grid_per_class)
        return grid


def _load(folder: Path, parts: Parts) -> int:
    """Load a checkpoint folder into `parts`; returns its step."""
    parts.load_state_dict(torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True))
    return parts.step


def check_resumable(paths: RunPaths, cfg: Config) -> None:
    """Refuse to resume a run directory written with other data or model shapes."""
    if not paths.config.is_file():
        return
    old = load_config(paths.config)
    pairs = [(f"data.{k}", old.data, cfg.data, k) for k in ("name", "root", "res")]
    pairs += [(f"prior_train.{k}", old.prior_train, cfg.prior_train, k) for k in SHAPE_FIELDS]
    changed = [name for name, a, b, k in pairs if getattr(a, k) != getattr(b, k)]
    if changed:
        raise ConfigError(
            f"run.out_dir {paths.root} holds a run with different {', '.join(changed)}; "
            "use another run.out_dir, or pass --no-resume to start over"
        )


def setup(cfg: Config, resume: bool, stop_after: int | None) -> Run:
    """Data, parts (restored from the newest checkpoint when resuming), tracker."""
    acc = Accelerator(cpu=not torch.cuda.is_available())  # multi-process CPU needs cpu=True
    data = load_dataset(cfg.data)
    check_config(cfg.prior_train, data.info)
    paths = RunPaths(Path(cfg.run.out_dir))
    ckpt = CheckpointManager(paths.ckpt)
    parts = build_parts(cfg.prior_train, data.info)
    if resume and ckpt.complete(warn=False):
        check_resumable(paths, cfg)
        ckpt.load_latest(lambda folder: _load(folder, parts))
        log.info("resuming %s at step %d", paths.root, parts.step)
    elif not resume and acc.is_main_process:
        ckpt.reset()
    if acc.is_main_process:
        save_config(cfg, paths.config)
    purge = parts.step + 1 if parts.step else 0
    tracker = make_tracker(paths.root, acc.is_main_process, purge_step=purge)
    tracker.hparams({f"prior_train.{k}": v for k, v in to_dict(cfg.prior_train).items()})
    last = parts.step if parts.step else -1
    return Run(cfg, paths, acc, data, parts, ckpt, tracker, stop_after, last)


@dataclass
class Stage:
    """One training stage over global steps [start, end)."""

    name: str
    start: int
    end: int
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    loss: Callable[[int], torch.Tensor]
    after_step: Callable[[int], None]


def run_stage(run: Run, stage: Stage) -> bool:
    """Train `stage` from the current step to its end; False when stopped early (stop_after)."""
    parts, pt = run.parts, run.pt
    bar = tqdm(
        total=stage.end - stage.start, initial=max(parts.step - stage.start, 0), desc=stage.name,
        disable=not (run.acc.is_main_process and show_progress(run.cfg.run.progress)),
    )  # fmt: skip
    while parts.step < stage.end:
        if run.stop_after is not None and parts.step >= run.stop_after:
            run.save()
            return False
        loss = stage.loss(parts.step - stage.start)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"{stage.name} loss is {loss.item()} at step {parts.step}; lower its lr"
            )
        stage.optimizer.zero_grad(set_to_none=True)
        run.acc.backward(loss)
        stage.optimizer.step()
        stage.scheduler.step()
        parts.step += 1
        stage.after_step(parts.step)
        bar.update()
        if parts.step % pt.log_every == 0 or parts.step == stage.end:
            lr = stage.scheduler.get_last_lr()[0]
            run.tracker.scalars(
                {f"loss/{stage.name}": loss.item(), f"lr/{stage.name}": lr}, parts.step
            )
            if bar.disable and run.acc.is_main_process:
                log.info("%s step %d/%d loss %.4f", stage.name, parts.step, stage.end, loss.item())
        if parts.step % pt.save_every == 0:
            run.save()
    bar.close()
    run.save()
    return True


def autoencoder_stage(run: Run) -> Stage:
    """Stage 1: the KL autoencoder on the real training images."""
    pt, acc, parts = run.pt, run.acc, run.parts
    model, opt = acc.prepare(AutoencoderLoss(parts.vae, pt.kl_weight), parts.ae_opt)
    images, side = run.data.train_images, run.data.info.res // factor(pt)

    def loss(i: int) -> torch.Tensor:
        idx, g = run.batch(len(images), pt.ae_batch, i)
        noise = torch.randn(len(idx), pt.latent_channels, side, side, generator=g)
        return model(to_pixels(images[idx]).to(acc.device), noise.to(acc.device))

    return Stage("autoencoder", 0, pt.ae_steps, opt, parts.ae_sched, loss, lambda step: None)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Posterior means [N, c, h, w] of uint8 images [N, C, H, W] (unscaled)."""
    vae.eval().requires_grad_(False)
    parts = [vae.encode(to_pixels(x).to(device)).latent_dist.mean for x in images.split(256)]
    return torch.cat(parts)


def unet_stage(run: Run) -> Stage:
    """Stage 2: the class-conditional UNet on the frozen autoencoder's latents."""
    pt, acc, parts, info = run.pt, run.acc, run.parts, run.data.info
    latents = encode_dataset(parts.vae.to(acc.device), run.data.train_images, acc.device)
    parts.scale_factor = float(1.0 / latents.std())
    latents, labels = latents * parts.scale_factor, run.data.train_labels.to(acc.device)
    spec = make_spec(pt, info, parts.scale_factor, "")
    ddpm = DDPMScheduler(
        spec.num_train_timesteps, spec.beta_start, spec.beta_end, spec.beta_schedule
    )
    model, opt = acc.prepare(parts.denoiser, parts.unet_opt)
    parts.ema.to(acc.device)
    null = info.num_classes

    def loss(i: int) -> torch.Tensor:
        idx, g = run.batch(len(latents), pt.unet_batch, i)
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=g).to(acc.device)
        t = torch.randint(0, spec.num_train_timesteps, (len(idx),), generator=g).to(acc.device)
        drop = (torch.rand(len(idx), generator=g) < pt.label_dropout).to(acc.device)
        y = torch.where(drop, torch.full_like(labels[idx], null), labels[idx])
        return F.mse_loss(model(ddpm.add_noise(z0, noise, t), t, y), noise)

    def after_step(step: int) -> None:
        parts.ema.update_parameters(acc.unwrap_model(model))
        if pt.sample_every and step % pt.sample_every == 0 and step < pt.ae_steps + pt.unet_steps:
            run.log_grid()

    end = pt.ae_steps + pt.unet_steps
    return Stage("unet", pt.ae_steps, end, opt, parts.unet_sched, loss, after_step)


def finish(run: Run) -> Path:
    """Sample grid, quality check, then the prior directory (EMA weights)."""
    pt, prior = run.pt, run.prior()
    save_png(run.log_grid(), pt.grid_per_class, run.paths.samples_png)
    extra: dict[str, Any] = {"trained_steps": {"autoencoder": pt.ae_steps, "unet": pt.unet_steps}}
    if pt.quality_per_class:
        report = measure_quality(
            prior, run.data, pt.quality_per_class, pt.guidance, pt.sample_steps, pt.seed,
            pt.quality_epochs,
        )  # fmt: skip
        run.tracker.scalars(report.as_metrics(), run.parts.step)
        extra["quality"] = {**report.as_metrics(), "n_per_class": pt.quality_per_class}
        print(report.summary(run.data.info.num_classes))
    prior.vae.register_to_config(scaling_factor=prior.spec.scale_factor)
    prior.spec = replace(prior.spec, extra=extra)
    write = partial(save_prior, spec=prior.spec, vae=prior.vae, unet=prior.unet,
                    class_embeddings=prior.class_embeddings)  # fmt: skip
    return write_dir_atomic(run.paths.prior, write)


def train_prior(cfg: Config, resume: bool = True, stop_after: int | None = None) -> Path | None:
    """Train (or resume) a prior into `cfg.run.out_dir`; returns the prior directory, or None
    when `stop_after` global steps were reached first (as if preempted; rerun to continue)."""
    run = setup(cfg, resume, stop_after)
    try:
        if run.parts.step < run.pt.ae_steps and not run_stage(run, autoencoder_stage(run)):
            return None
        if not run_stage(run, unet_stage(run)):
            return None
        if not run.acc.is_main_process:
            return None
        return finish(run)
    finally:
        run.tracker.close()

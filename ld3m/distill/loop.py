"""`ld3m distill`: the distillation loop. Resumable, observable, the same code on every rank.

Per iteration: draw the iteration's noise (fixed for both generator phases), render the images,
let the objective compute d loss / d images, back-propagate that through the generator into Z
and c (latent space) or apply it to the pixels, step SGD, keep the step size positive. Every
random draw comes from streams derived from (seed, iteration, rank), so a resumed run continues
exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ld3m.artifacts import SetMeta, load_set, save_set
from ld3m.artifacts import SyntheticSet as SetFile
from ld3m.checkpoint import CheckpointManager
from ld3m.config.schema import Config
from ld3m.data.datasets import RealDataset
from ld3m.distill.objectives import MatchingObjective, build_objective
from ld3m.distill.synthetic import build_synthetic_set, expert_logits
from ld3m.errors import ConfigError, Interrupted, TrainingError
from ld3m.generator.backward import generate_and_backward, resolve_scheme
from ld3m.generator.ldm import LD3MGenerator, draw_noise
from ld3m.methods import EXPERT_OBJECTIVES, method_name
from ld3m.parallel import Parallel, SyncedOptimizer, setup_parallel
from ld3m.paths import STATE_FILE, RunPaths
from ld3m.prior.model import Prior
from ld3m.tracking import Tracker
from ld3m.utils.progress import progress
from ld3m.utils.seeding import stream, stream_seed
from ld3m.utils.signals import StopFlag

log = logging.getLogger(__name__)

DEFAULT_LR = {  # (space, objective) -> lr of Z and c, or of the pixels (method notes, 11.1)
    ("latent", "dc"): 0.1,
    ("latent", "dcc"): 0.1,
    ("latent", "dm"): 1.0,
    ("latent", "mtt"): 500.0,  # LD3M's 1000 was applied to TESLA's halved gradient
    ("pixel", "dc"): 0.1,
    ("pixel", "dcc"): 0.1,  # DCC's image lr, as DC's
    ("pixel", "dm"): 1.0,
    ("pixel", "mtt"): 1000.0,
    ("latent", "sre2l"): 0.05,  # Adam; ld3m's choice (no published latent SRe2L)
    ("pixel", "sre2l"): 0.25,  # Adam, SRe2L/CDA recover (seed-methods notes, section 3)
}
ADAM_BETAS = (0.5, 0.9)
"""Adam betas of the synthetic set with distill.optimizer=adam (SRe2L's recover step)."""


@dataclass
class LoopState:
    """Counters that are part of every checkpoint."""

    step: int = 0
    nan_streak: int = 0
    skipped: int = 0


@dataclass
class StepReport:
    """What one iteration measured."""

    loss: float
    grad_norms: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: bool = False


class Distiller:
    """Owns the synthetic set, its optimiser, the objective and the run directory."""

    def __init__(
        self,
        cfg: Config,
        data: RealDataset,
        prior: Prior | None,
        experts: object | None = None,
        par: Parallel | None = None,
    ) -> None:
        self.cfg, self.data = cfg, data
        self.par = par if par is not None else Parallel()
        d = cfg.distill
        self.paths = RunPaths(Path(cfg.run.out_dir))
        info = data.info
        learns_lr = d.objective == "mtt"
        if prior is not None:
            prior = prior.to(self.par.device)
        embed = expert_logits(d.arch, experts, info) if d.init == "kmeans" else None
        self.synset = build_synthetic_set(
            data, d.space, d.ipc, d.init, d.seed, d.mtt.lr_init if learns_lr else None, prior, embed
        ).to(self.par.device)
        self.generator = None
        if d.space == "latent":
            assert prior is not None
            self.generator = LD3MGenerator(prior, cfg.generator, info.res, info.mean, info.std)
        self.objective: MatchingObjective = build_objective(
            d, data, info.num_classes, info.channels, info.res, experts
        )
        lr = d.lr if d.lr is not None else DEFAULT_LR[(d.space, d.objective)]
        groups = self.synset.param_groups(lr, d.mtt.lr_lr)
        if d.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(groups, lr=lr, betas=ADAM_BETAS)
        else:
            opt = torch.optim.SGD(groups, lr=lr, momentum=d.momentum)
        self.base_lr = lr
        self.optimizer = SyncedOptimizer(self.synset, opt, self.par)
        self.experts = experts
        self.state = LoopState()
        self.checkpoints = CheckpointManager(self.paths.ckpt)
        self.scheme = self.pick_scheme()

    def pick_scheme(self) -> tuple[str, bool]:
        """Backward scheme and checkpointing for the generator (logged once)."""
        if self.generator is None:
            return ("pixel", False)
        scheme, ckpt, reason = resolve_scheme(self.generator, len(self.synset.labels))
        log.debug("generator backward: %s, checkpointing %s (%s)", scheme, ckpt, reason)
        return (scheme, ckpt)

    def noise(self, step: int) -> torch.Tensor | None:
        """The iteration's generator noise, the same on every rank."""
        if self.generator is None:
            return None
        shape = tuple(self.synset.latents.shape)
        return draw_noise(shape, stream_seed(self.cfg.distill.seed, step, 0, 1)).to(self.par.device)

    def step(self) -> StepReport:
        """One distillation iteration."""
        start = time.perf_counter()
        step, d = self.state.step, self.cfg.distill
        rng = stream(d.seed, step, self.par.rank, 2)
        self.optimizer.zero_grad()
        loss = self.compute_grads(rng, self.noise(step))
        report = self.average(loss)
        if not all(map(math.isfinite, [report.loss, *report.grad_norms.values()])):
            self.skip_step(report.loss)
            report.skipped = True
        else:
            self.state.nan_streak = 0
            self.set_lr(step)
            self.optimizer.step()
            self.keep_lr_positive()
            self.keep_pixels_valid()
        self.state.step += 1
        report.seconds = time.perf_counter() - start
        return report

    def compute_grads(self, rng: torch.Generator, noise: torch.Tensor | None) -> float:
        """Fill .grad of the synthetic set's parameters with this rank's gradient; return the
        objective's loss. Autograd runs on detached copies of the parameters and the result is
        assigned, so no gradient hook of a wrapper (DeepSpeed) fires before the averaging."""
        syn, labels = self.synset, self.synset.labels
        leaves = [p.detach().requires_grad_(True) for p in syn.content()]
        syn_lr = syn.syn_lr.detach() if syn.syn_lr is not None else None
        result = {}

        def surrogate(images: torch.Tensor) -> torch.Tensor:
            """Scalar whose gradient w.r.t. `images` is the objective's image gradient."""
            out = self.objective.image_grad(images.detach(), labels, syn_lr, rng, self.state.step)
            result["out"] = out
            return (images * out.grad.to(images)).sum()

        if self.generator is None:
            surrogate(leaves[0]).backward()
        else:
            scheme, ckpt = self.scheme
            generate_and_backward(
                self.generator, *leaves, noise, surrogate, scheme, ckpt, self.cfg.generator.chunk
            )
        for param, leaf in zip(syn.content(), leaves, strict=True):
            param.grad = leaf.grad
        out = result["out"]
        if syn.syn_lr is not None and out.lr_grad is not None:
            syn.syn_lr.grad = out.lr_grad.detach().reshape(syn.syn_lr.shape).to(syn.syn_lr)
        return float(out.loss)

    def average(self, loss: float) -> StepReport:
        """Average gradients (plain data parallelism) and the loss over ranks; the report's
        gradient norms are those of the averaged gradient (under ZeRO: the mean of the ranks'
        local norms). Every rank sees the same report, so all skip or step together."""
        self.optimizer.average_grads()
        norms = self.grad_norms()
        values = torch.tensor([loss, *norms.values()], dtype=torch.float64)
        self.par.mean_([values])
        mean_loss, *mean_norms = values.tolist()
        return StepReport(loss=mean_loss, grad_norms=dict(zip(norms, mean_norms, strict=True)))

    def grad_norms(self) -> dict[str, float]:
        """Gradient norms of each learnable tensor (the paper's Table 1 quantity for Z)."""
        names = {"images": "pixels", "latents": "z", "context": "c", "syn_lr": "syn_lr"}
        return {
            names[name]: float(p.grad.norm())
            for name, p in self.synset.named_parameters()
            if p.grad is not None
        }

    def skip_step(self, loss: float) -> None:
        """NaN/inf guard: drop this step's gradients; abort after `nan_patience` in a row."""
        self.optimizer.zero_grad()
        self.state.nan_streak += 1
        self.state.skipped += 1
        log.warning(
            "step %d: non-finite loss or gradient (%s); step skipped", self.state.step, loss
        )
        if self.state.nan_streak >= self.cfg.distill.nan_patience:
            raise TrainingError(
                f"{self.state.nan_streak} non-finite losses in a row at step {self.state.step}; "
                "lower distill.lr (or distill.mtt.lr_lr), then resume from the last checkpoint"
            )

    def set_lr(self, step: int) -> None:
        """The content learning rate of `step`: constant, or cosine to 0 over the iterations."""
        d = self.cfg.distill
        if d.lr_schedule == "constant":
            return
        lr = self.base_lr * 0.5 * (1 + math.cos(math.pi * step / max(d.iterations, 1)))
        for group in self.optimizer.optimizer.param_groups:
            if group.get("name") == "content":
                group["lr"] = lr

    def keep_pixels_valid(self) -> None:
        """Objectives that ask for it (SRe2L) keep pixels in the data's valid [0, 1] range."""
        if self.synset.space != "pixel" or not getattr(self.objective, "clamps_pixels", False):
            return
        info = self.data.info
        mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        std = torch.tensor(info.std).view(1, -1, 1, 1)
        low, high = (0 - mean) / std, (1 - mean) / std
        self.optimizer.clamp_(
            self.synset.images, low.to(self.synset.images), high.to(self.synset.images)
        )

    def keep_lr_positive(self) -> None:
        """Clamp the learnable step size to at least distill.mtt.min_lr."""
        if self.synset.syn_lr is not None:
            self.optimizer.clamp_(self.synset.syn_lr, self.cfg.distill.mtt.min_lr)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything needed to continue exactly."""
        state = {
            "synset": self.synset.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loop": self.state.__dict__.copy(),
        }
        if self.experts is not None and hasattr(self.experts, "state_dict"):
            state["experts"] = self.par.gather_object(self.experts.state_dict())  # one per rank
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; shapes must match (IPC, space, prior)."""
        try:
            self.synset.load_state_dict(state["synset"])
        except RuntimeError as exc:
            raise ConfigError(
                f"checkpoint does not fit this config ({str(exc).splitlines()[0]}); "
                "IPC, space and prior cannot change on resume: use a new run.out_dir"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.state = LoopState(**state["loop"])
        if "experts" in state and self.experts is not None:
            per_rank = state["experts"]
            if len(per_rank) != self.par.world:
                raise ConfigError(
                    f"checkpoint was written by {len(per_rank)} rank(s), this run has "
                    f"{self.par.world}; resume with the same number of processes"
                )
            self.experts.load_state_dict(per_rank[self.par.rank])

    def save(self) -> None:
        """Atomic checkpoint of the current state (collective: every rank calls it)."""
        state = self.state_dict()
        par = self.par

        def write(folder: Path) -> None:
            if par.is_main:
                torch.save(state, folder / STATE_FILE)
            self.optimizer.save_sharded(folder)

        self.checkpoints.save_collective(self.state.step, write, par.is_main, par.barrier)

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any; True if resumed."""

        def load(folder: Path) -> Path:
            self.optimizer.load_sharded(folder)
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
            self.load_state_dict(state)
            return folder

        found = self.checkpoints.load_latest(load) if self.par.is_main else None
        found = self.par.broadcast_object(found)
        if found is not None and not self.par.is_main:
            load(found)
        if found is not None:
            log.info("resumed from %s at step %d", found, self.state.step)
        return found is not None

    # ------------------------------------------------------------------ products

    def export(self, noise_seed: int | None = None) -> Path:
        """Write the current synthetic set (images decoded with a recorded seed) and its grid."""
        d, info = self.cfg.distill, self.data.info
        seed = stream_seed(d.seed, 0, 0, 3) if noise_seed is None else noise_seed
        noise = None
        if self.generator is not None:
            noise = draw_noise(tuple(self.synset.latents.shape), seed)
        images = self.synset.render(self.generator, noise)
        latents = {}
        if self.synset.space == "latent":
            latents = {"z": self.synset.latents.detach(), "c": self.synset.context.detach()}
        lr = float(self.synset.syn_lr.detach()) if self.synset.syn_lr is not None else None
        meta = SetMeta(
            dataset=info.name, num_classes=info.num_classes, channels=info.channels,
            res=info.res, mean=tuple(info.mean), std=tuple(info.std), ipc=d.ipc,
            method=method_name(self.cfg),
            class_names=tuple(info.class_names), distill_arch=d.arch, step=self.state.step,
            extra={"noise_seed": seed, "skip": self.cfg.generator.skip,
                   "steps": self.cfg.generator.steps, "run": str(self.paths.root)},
        )  # fmt: skip
        path = self.paths.distilled_set(self.state.step)
        save_set(path, SetFile(images, self.synset.labels.detach(), meta, lr, latents))
        return path

    def log_step(self, tracker: Tracker, report: StepReport) -> None:
        """Scalars of one iteration (TensorBoard and metrics.jsonl)."""
        scalars = {"loss/match": report.loss, "time/iteration_s": report.seconds}
        scalars.update({f"grad_norm/{k}": v for k, v in report.grad_norms.items()})
        if self.synset.syn_lr is not None:
            scalars["syn_lr"] = float(self.synset.syn_lr.detach())
        scalars["nan_skipped"] = float(self.state.skipped)
        tracker.scalars(scalars, self.state.step)

    def run(self, tracker: Tracker, resume: bool = True, stop: StopFlag | None = None) -> Path:
        """Iterate to distill.iterations with periodic checkpoints, exports and image grids; on
        a stop request (signal) save a checkpoint and raise `Interrupted`."""
        stop = stop if stop is not None else StopFlag(signals=())
        d, main = self.cfg.distill, self.par.is_main
        if resume:
            self.resume()
        mode = self.cfg.run.progress if main else "off"
        for _ in progress(range(self.state.step, d.iterations), mode, "distill"):
            if self.par.any(stop.requested):
                self.save()
                raise Interrupted(
                    f"stopped by a signal at step {self.state.step}; checkpoint saved in "
                    f"{self.paths.ckpt}; rerun the same command to resume"
                )
            report = self.step()
            self.log_step(tracker, report)
            step = self.state.step
            if main and step % d.image_every == 0:
                tracker.images("synthetic", self.grid_images(), step, nrow=d.ipc)
            if step % d.save_every == 0:
                self.save()
            if main and step % d.export_every == 0:
                self.quick_eval(tracker, self.export())
        done = self.checkpoints.complete(warn=False) if main else []
        if self.par.broadcast_object(not done or done[-1][0] != self.state.step):
            self.save()
        final = self.paths.distilled_set(self.state.step)
        if main and not final.is_file():  # a rerun of a finished run rewrites nothing
            self.quick_eval(tracker, self.export())
        return final

    def quick_eval(self, tracker: Tracker, set_path: Path) -> float | None:
        """Test accuracy of one short-trained `eval.distill_arch` network on an exported set
        (distill.quick_eval_epochs > 0), logged as `eval/quick_acc`."""
        from dataclasses import replace

        from ld3m.evaluate.train_eval import TrainData, at_ipc, resolve_lr, train_and_test

        epochs = self.cfg.distill.quick_eval_epochs
        if epochs <= 0:
            return None
        ecfg = at_ipc(replace(self.cfg.eval, epochs=epochs), self.cfg.distill.ipc)
        synset = load_set(set_path)
        test_images, test_labels = self.data.test_tensors()
        tensors = TrainData(synset.images, synset.labels, test_images, test_labels,
                            self.data.info.num_classes)  # fmt: skip
        arch = ecfg.distill_arch
        result = train_and_test(arch, tensors, ecfg, resolve_lr(ecfg, arch, synset.lr), 0, "off")
        tracker.scalar("eval/quick_acc", result.acc, self.state.step)
        log.info("step %d: quick eval %s %.2f%%", self.state.step, arch, 100 * result.acc)
        return result.acc

    def grid_images(self) -> torch.Tensor:
        """Current images in [0, 1] for a TensorBoard grid."""
        noise = self.noise(self.state.step)
        images = self.synset.render(self.generator, noise)
        info = self.data.info
        mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        std = torch.tensor(info.std).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)


def run_distillation(cfg: Config, resume: bool = True) -> Path:
    """Build everything from the config, distil, return the last exported synthetic set."""
    from ld3m.config.io import save_config
    from ld3m.data.datasets import load_dataset
    from ld3m.prior.model import load_prior
    from ld3m.tracking import make_tracker

    paths = RunPaths(Path(cfg.run.out_dir))
    par = setup_parallel(cfg.run.zero_stage)
    data = load_dataset(cfg.data)
    if cfg.distill.space == "latent" and not cfg.prior.path:
        raise ConfigError(
            "distill.space=latent needs prior.path (`ld3m prior train` or `ld3m prior convert` "
            "make one), or use distill.space=pixel"
        )
    prior = load_prior(cfg.prior.path) if cfg.distill.space == "latent" else None
    uses = cfg.distill.objective in EXPERT_OBJECTIVES
    experts = build_experts(cfg, par.rank, par.world) if uses else None
    distiller = Distiller(cfg, data, prior, experts, par)
    if par.is_main:
        if not resume:
            distiller.checkpoints.reset()
        save_config(cfg, paths.config)
    par.barrier()
    start = distiller.checkpoints.complete(warn=False)
    purge = start[-1][0] if start and resume else None
    tracker = make_tracker(paths.root, par.is_main, purge_step=purge)
    sections = ("data", "distill", "generator", "prior", "experts")
    tracker.hparams(flat_config(cfg, sections))
    try:
        with StopFlag() as stop:
            return distiller.run(tracker, resume=resume, stop=stop)
    finally:
        tracker.close()


def flat_config(cfg: Config, sections: tuple[str, ...]) -> dict[str, object]:
    """`section.key` -> value of the given config sections (nested sections flattened)."""
    from ld3m.config.io import to_dict

    out: dict[str, object] = {}

    def walk(prefix: str, tree: dict) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                out[f"{prefix}{key}"] = value

    tree = to_dict(cfg)
    for section in sections:
        walk(f"{section}.", tree[section])
    return out


def build_experts(cfg: Config, rank: int = 0, world: int = 1) -> object:
    """The expert sampler over the complete shards of experts.dir."""
    from ld3m.experts.sampler import ExpertSampler
    from ld3m.experts.store import ExpertStore

    if not cfg.experts.dir:
        raise ConfigError(
            f"distill.objective={cfg.distill.objective} needs experts.dir (train them with "
            "`ld3m experts`)"
        )
    return ExpertSampler(ExpertStore(Path(cfg.experts.dir)), cfg.distill.seed, rank, world)

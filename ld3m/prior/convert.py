"""`ld3m prior convert`: CompVis latent-diffusion checkpoint (cin256-v2) -> ld3m prior directory.

Names come from `ld3m.prior.compvis_keys` (generated from the configs, not hard-coded for one
size). Every source key is consumed or named in IGNORED_KEYS; the schedule is checked against the
spec, every tensor against the meta-device target models, and the written prior is reloaded and
compared before it is renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ld3m.errors import CheckpointError, Ld3mError
from ld3m.prior.architectures import CIN256_UNET, CIN256_VQ, build_unet, build_vq, cin256_spec
from ld3m.prior.compvis_keys import (
    CLASS_KEY,
    SCHEDULE_KEYS,
    UNET_PREFIX,
    VQ_PREFIX,
    Leaf,
    compvis_key_shapes,
    unet_leaves,
    vq_leaves,
)
from ld3m.prior.layout import PriorSpec
from ld3m.prior.model import load_prior, make_ddim, save_prior

__all__ = [
    "ConvertedWeights",
    "check_schedule",
    "check_shapes",
    "compvis_key_shapes",
    "compvis_to_diffusers",
    "convert_checkpoint",
    "convert_main",
    "read_checkpoint",
]

log = logging.getLogger(__name__)

IGNORED_KEYS = ("logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates")
"""Training-only entries some LatentDiffusion checkpoints carry; dropped silently."""
TRUST_HINT = "rerun with --trust-checkpoint only if you trust the file"


@dataclass
class ConvertedWeights:
    """A CompVis checkpoint renamed to the diffusers models of an ld3m prior."""

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    class_embeddings: torch.Tensor
    """[num_classes + 1, context_dim]; the last row is the unconditional class."""
    schedule: dict[str, torch.Tensor]
    """The DDPM buffers (betas, alphas_cumprod, ...), each [num_train_timesteps]."""


# ---------------------------------------------------------------- conversion and checks


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(keys[:3]) + more


def compvis_to_diffusers(
    state: Mapping[str, torch.Tensor], unet_cfg: Mapping[str, Any], vq_cfg: Mapping[str, Any]
) -> ConvertedWeights:
    """Rename a CompVis state dict to diffusers names; every key must be used or ignored."""
    remaining, missing = dict(state), []

    def take(leaves: list[Leaf], prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for leaf in leaves:
            tensor = remaining.pop(prefix + leaf.src, None)
            if tensor is None:
                missing.append(prefix + leaf.src)
            else:
                out[leaf.dst] = tensor.flatten(1) if leaf.squeeze and tensor.ndim == 4 else tensor
        return out

    unet, vae = take(unet_leaves(unet_cfg), UNET_PREFIX), take(vq_leaves(vq_cfg), VQ_PREFIX)
    extra = take([Leaf(k, k, ()) for k in (CLASS_KEY, *SCHEDULE_KEYS)], "")
    for key in IGNORED_KEYS:
        remaining.pop(key, None)
    if missing:
        raise CheckpointError(
            f"checkpoint lacks {len(missing)} expected keys ({_names(missing)}); "
            "it is not a LatentDiffusion checkpoint of this architecture (cin256-v2)"
        )
    if remaining:
        raise CheckpointError(
            f"checkpoint has {len(remaining)} unknown keys ({_names(list(remaining))}); "
            "it is not a LatentDiffusion checkpoint of this architecture (cin256-v2)"
        )
    schedule = {k: extra[k] for k in SCHEDULE_KEYS}
    return ConvertedWeights(unet, vae, extra[CLASS_KEY], schedule)


def check_schedule(schedule: Mapping[str, torch.Tensor], spec: PriorSpec) -> None:
    """The checkpoint's betas/alphas_cumprod must equal the spec's schedule (within 1e-6)."""
    betas = schedule["betas"].double()
    expected = make_ddim(spec).betas.double()
    what = f"{spec.beta_schedule} {spec.beta_start}..{spec.beta_end}, {len(expected)} steps"
    if betas.shape != expected.shape:
        raise CheckpointError(f"checkpoint has {betas.numel()} betas, the prior spec ({what})")
    err = float((betas - expected).abs().max())
    if err > 1e-6:
        raise CheckpointError(
            f"checkpoint betas differ from the prior spec ({what}) by {err:.2e}; "
            "this checkpoint was trained with another noise schedule"
        )
    abar = torch.cumprod(1 - betas, 0)
    if float((schedule["alphas_cumprod"].double() - abar).abs().max()) > 1e-5:
        raise CheckpointError(
            "checkpoint alphas_cumprod != cumprod(1 - betas); the file is damaged"
        )


def check_shapes(
    weights: ConvertedWeights, unet_cfg: dict[str, Any], vq_cfg: dict[str, Any], spec: PriorSpec
) -> None:
    """Compare every converted tensor with the meta-device target models (no memory used)."""
    problems: list[str] = []
    for part, tensors, model in (
        ("unet", weights.unet, build_unet(unet_cfg, "meta")),
        ("vae", weights.vae, build_vq(vq_cfg, "meta")),
    ):
        target = model.state_dict()
        problems += [f"{part} lacks {k}" for k in target if k not in tensors]
        problems += [f"{part} has no {k}" for k in tensors if k not in target]
        problems += [
            f"{part}.{k} is {tuple(t.shape)}, expected {tuple(target[k].shape)}"
            for k, t in tensors.items()
            if k in target and t.shape != target[k].shape
        ]
    rows = (spec.num_classes + 1, int(unet_cfg["cross_attention_dim"]))
    if tuple(weights.class_embeddings.shape) != rows:
        problems.append(f"{CLASS_KEY} is {tuple(weights.class_embeddings.shape)}, expected {rows}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit the target architecture: {_names(problems)}; "
            "it is not a cin256-v2 checkpoint"
        )


def _load_model(
    build: Callable[..., torch.nn.Module], cfg: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """Build on meta, then take the converted tensors (float32) with strict=True."""
    model = build(cfg, "meta")
    model.load_state_dict(
        {k: t.to(torch.float32).contiguous() for k, t in tensors.items()}, strict=True, assign=True
    )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"no weights for {_names(left)}; report this as an ld3m bug")
    return model.eval()


# ---------------------------------------------------------------- files


def read_checkpoint(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .ckpt/.pt (top-level `state_dict` or flat) or .safetensors file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass the cin256-v2 model.ckpt path")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise _unreadable(path, exc) from None
    try:
        obj = torch.load(
            path, map_location="cpu", weights_only=not trust_pickle, mmap=zipfile.is_zipfile(path)
        )
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise CheckpointError(
                f"checkpoint {path} holds pickled objects ({found[1]}) besides tensors; "
                f"{TRUST_HINT}"
            ) from None
        raise _unreadable(path, exc) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    odd = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"checkpoint {path} has non-tensor entries ({_names(odd)})")
    return dict(obj)


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    text = str(exc).split("WeightsUnpickler error:")[-1].strip()  # skip torch's preamble
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    return CheckpointError(f"checkpoint {path} is unreadable ({first}); re-download it")


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise Ld3mError(f"output {out_dir} is a file; choose a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise Ld3mError(f"output directory {out_dir} is not empty; pass --force to replace it")


def convert_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    trust_pickle: bool = False,
    force: bool = False,
    unet_cfg: dict[str, Any] = CIN256_UNET,
    vq_cfg: dict[str, Any] = CIN256_VQ,
    spec: PriorSpec | None = None,
) -> Path:
    """Convert a CompVis checkpoint into a prior directory (written atomically); return it."""
    ckpt_path, out_dir = Path(ckpt_path).expanduser(), Path(out_dir).expanduser()
    _check_out_dir(out_dir, force)
    spec = spec or cin256_spec()
    spec = spec if spec.source else dataclasses.replace(spec, source=str(ckpt_path))
    log.info("reading %s", ckpt_path)
    state = read_checkpoint(ckpt_path, trust_pickle)
    try:
        weights = compvis_to_diffusers(state, unet_cfg, vq_cfg)
        check_schedule(weights.schedule, spec)
        check_shapes(weights, unet_cfg, vq_cfg, spec)
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt_path}: {exc}") from None
    unet = _load_model(build_unet, unet_cfg, weights.unet)
    vae = _load_model(build_vq, vq_cfg, weights.vae)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        log.info("writing %s", tmp)
        save_prior(tmp, spec, vae, unet, weights.class_embeddings.float())
        _verify(tmp, unet, vae, weights.class_embeddings)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _verify(root: Path, unet: torch.nn.Module, vae: torch.nn.Module, table: torch.Tensor) -> None:
    """Load the written prior once and compare every tensor with what was converted."""
    prior = load_prior(root)
    bad = []
    for name, got, want in (("unet", prior.unet, unet), ("vae", prior.vae, vae)):
        written = got.state_dict()
        bad += [
            f"{name}.{k}" for k, t in want.state_dict().items() if not torch.equal(written[k], t)
        ]
    if not torch.equal(prior.class_embeddings, table.float()):
        bad.append("class_embeddings")
    if bad:
        raise CheckpointError(f"written prior {root} differs from the checkpoint at {_names(bad)}")


# ---------------------------------------------------------------- command line


def convert_main(args: argparse.Namespace) -> None:
    """`ld3m prior convert CHECKPOINT OUT`: print the written prior directory."""
    out = convert_checkpoint(
        args.checkpoint, args.out, trust_pickle=args.trust_checkpoint, force=args.force
    )
    print(out)

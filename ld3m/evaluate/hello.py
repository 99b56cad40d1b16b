"""HeLlO's image-to-label projector (seed-methods notes, section 4): `ld3m hello` trains it,
evaluation with eval.labels=projector labels every augmented batch with it, online.

    f(x) = s * (W + A_h B_h) . normalize(P E_I(x))

E_I is the image encoder of a user-supplied CLIP checkpoint (transformers layout, read from a
local directory, never downloaded), P its visual projection, s its logit scale. W starts as the
normalised text embeddings of the class prompts, i.e. CLIP's zero-shot classifier, so it costs
no storage; the image encoder's attention and MLP projections get LoRA updates of rank
`encoder_rank`, W one of rank `head_rank` (peft). Training loss on real train images:
MSE(f(x), Y') + lambda CE(f(x), y), with Y' the mean logits of weak teachers (snapshots of an
expert trajectory; how HeLlO combines its 9 teachers is not published, the mean is ld3m's
choice). Only the low-rank factors, W and the settings are saved (projector.safetensors).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ld3m.config.schema import Config, HelloConfig
from ld3m.data.datasets import DatasetInfo, RealDataset
from ld3m.errors import CheckpointError, ConfigError
from ld3m.utils.progress import progress

log = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"
ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
"""Linear layers of the CLIP image encoder that get low-rank updates."""


def load_clip(path: str | Path) -> tuple[Any, Any]:
    """(CLIPModel, tokenizer) from a local checkpoint directory; a clear error if absent."""
    from transformers import AutoTokenizer, CLIPModel

    where = Path(path)
    if not str(path) or not (where / "config.json").is_file():
        raise ConfigError(f"no CLIP checkpoint at {str(path) or '(hello.clip is empty)'}; set "
                          "hello.clip to a local directory saved by transformers "
                          "(config.json, weights, tokenizer files)")  # fmt: skip
    try:
        model = CLIPModel.from_pretrained(where, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the CLIP checkpoint at {where}: {exc}; save it with "
                          "CLIPModel.save_pretrained and its tokenizer") from exc  # fmt: skip
    return model, tokenizer


@torch.no_grad()
def class_text_embeddings(
    clip: Any, tokenizer: Any, names: tuple[str, ...], template: str
) -> Tensor:
    """Normalised text embeddings [classes, D] of the class prompts (the zero-shot head)."""
    prompts = [template.format(name) for name in names]
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    out = clip.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return F.normalize(clip.text_projection(out.pooler_output), dim=-1)


class Projector(nn.Module):
    """CLIP image encoder + visual projection + label head W [classes, D], on images
    normalised like the dataset (`info`); see the module doc."""

    def __init__(self, clip: Any, head: Tensor, info: DatasetInfo) -> None:
        super().__init__()
        self.vision, self.proj = clip.vision_model, clip.visual_projection
        self.head = nn.Linear(head.shape[1], head.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(head)
        self.register_buffer("scale", clip.logit_scale.detach().exp().reshape(()))
        vc = clip.config.vision_config
        self.size = int(vc.image_size)
        self.register_buffer("data_mean", torch.tensor(info.mean).view(1, -1, 1, 1))
        self.register_buffer("data_std", torch.tensor(info.std).view(1, -1, 1, 1))
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def clip_input(self, x: Tensor) -> Tensor:
        """Dataset-normalised images [B,C,H,W] -> CLIP's input [B,3,size,size]."""
        x01 = x * self.data_std + self.data_mean
        if x01.shape[1] == 1:
            x01 = x01.expand(-1, 3, -1, -1)
        if x01.shape[-1] != self.size:
            x01 = F.interpolate(x01, size=(self.size, self.size), mode="bilinear",
                                align_corners=False)  # fmt: skip
        return (x01 - self.clip_mean) / self.clip_std

    def forward(self, x: Tensor) -> Tensor:
        """Label logits [B, classes] of dataset-normalised images x."""
        pooled = self.vision(pixel_values=self.clip_input(x)).pooler_output
        return self.scale * self.head(F.normalize(self.proj(pooled), dim=-1))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def add_low_rank(projector: Projector, cfg: HelloConfig) -> Projector:
    """Inject LoRA factors (peft) into the encoder and the head; only they are trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    for rank in (cfg.encoder_rank, cfg.head_rank):
        if rank < 1:
            raise ConfigError(f"hello ranks must be >= 1, got encoder {cfg.encoder_rank}, "
                              f"head {cfg.head_rank}")  # fmt: skip
    lora = LoraConfig(r=cfg.encoder_rank, lora_alpha=cfg.encoder_rank,
                      target_modules=[*ENCODER_TARGETS, "head"],
                      rank_pattern={"head": cfg.head_rank},
                      alpha_pattern={"head": cfg.head_rank})  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        projector = inject_adapter_in_model(lora, projector)
    for name, p in projector.named_parameters():
        p.requires_grad_("lora_" in name)
    return projector


def build_projector(cfg: HelloConfig, info: DatasetInfo, head: Tensor | None = None) -> Projector:
    """A projector for `info`'s classes on cfg.clip, head W from the prompts (or `head`)."""
    clip, tokenizer = load_clip(cfg.clip)
    if head is None:
        head = class_text_embeddings(clip, tokenizer, info.class_names, cfg.template)
    return add_low_rank(Projector(clip, head, info), cfg)


def weak_teacher_logits(cfg: Config, data: RealDataset) -> Any:
    """Y'(x): mean logits of the weak teachers (snapshots of expert 0 of experts.dir)."""
    from ld3m.experts.sampler import first_expert
    from ld3m.models.functional import functional_forward
    from ld3m.models.networks import build_network

    if not cfg.experts.dir:
        raise ConfigError("ld3m hello needs weak teachers: set experts.dir to an expert buffer "
                          "(`ld3m experts`)")  # fmt: skip
    traj = first_expert(cfg.experts.dir)
    epochs = cfg.hello.teacher_epochs or tuple(range(1, traj.snapshots.shape[0]))
    bad = [e for e in epochs if not 0 <= e < traj.snapshots.shape[0]]
    if bad:
        raise ConfigError(f"hello.teacher_epochs {bad} are not stored in {cfg.experts.dir} "
                          f"(epochs 0..{traj.snapshots.shape[0] - 1})")  # fmt: skip
    info = data.info
    net = build_network(traj.arch, info.channels, info.num_classes, info.res).eval()
    thetas = [traj.snapshots[e] for e in epochs]

    @torch.no_grad()
    def logits(x: Tensor) -> Tensor:
        return torch.stack([functional_forward(net, t, x) for t in thetas]).mean(dim=0)

    return logits


def train_projector(cfg: Config, data: RealDataset, out_dir: Path) -> Path:
    """Train the projector on the real train split; write it to out_dir/projector.safetensors."""
    h = cfg.hello
    projector = build_projector(h, data.info)
    teachers = weak_teacher_logits(cfg, data)
    params = [p for p in projector.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=h.lr)
    x_all, y_all = data.train_tensors()
    gen = torch.Generator().manual_seed(h.seed)
    first = last = float("nan")
    for step in progress(range(h.steps), cfg.run.progress, desc="hello projector"):
        idx = torch.randint(len(y_all), (h.batch,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        out = projector(x)
        loss = F.mse_loss(out, teachers(x)) + h.ce_weight * F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = float(loss.detach())
        first = last if step == 0 else first
    log.info("hello projector: loss %.4f -> %.4f over %d steps", first, last, h.steps)
    return save_projector(projector, h, data.info, out_dir)


def save_projector(
    projector: Projector, cfg: HelloConfig, info: DatasetInfo, out_dir: Path
) -> Path:
    """The low-rank factors and W (safetensors, atomically), with the settings as metadata."""
    tensors = {n: p.detach().contiguous() for n, p in projector.named_parameters()
               if "lora_" in n or n == "head.base_layer.weight"}  # fmt: skip
    meta = {"hello": json.dumps({k: getattr(cfg, k) for k in HELLO_KEYS}),
            "dataset": info.name, "classes": json.dumps(list(info.class_names))}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = out_dir / PROJECTOR_FILE, out_dir / (PROJECTOR_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


HELLO_KEYS = ("clip", "template", "encoder_rank", "head_rank", "seed")
"""Settings that rebuild a saved projector's structure."""


def load_projector(folder: str | Path, info: DatasetInfo) -> Projector:
    """A frozen projector (eval mode) from `ld3m hello`'s output folder, for `info`'s classes."""
    from safetensors import safe_open

    path = Path(folder) / PROJECTOR_FILE
    if not path.is_file():
        raise ConfigError(f"no HeLlO projector at {path}; train one with `ld3m hello` and set "
                          "eval.projector to its folder")  # fmt: skip
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path} is not a readable projector ({exc}); retrain it with "
                              "`ld3m hello`") from exc  # fmt: skip
    classes = tuple(json.loads(meta["classes"]))
    if classes != tuple(info.class_names):
        raise ConfigError(f"projector {path} labels {meta['dataset']} classes, not "
                          f"{info.name}'s; train one on this dataset")  # fmt: skip
    cfg = HelloConfig(**json.loads(meta["hello"]))
    projector = build_projector(cfg, info, head=tensors["head.base_layer.weight"])
    unexpected = projector.load_state_dict(tensors, strict=False).unexpected_keys
    if unexpected:
        raise CheckpointError(f"{path} holds tensors {unexpected[:3]} this CLIP checkpoint "
                              f"has no place for; use the CLIP it was trained with "
                              f"({cfg.clip})")  # fmt: skip
    return projector.eval().requires_grad_(False)

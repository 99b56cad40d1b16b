"""The on-disk prior format. Only this module spells its file names.

A prior directory holds
    prior.json                    PriorSpec: schedule, latent scale factor, sizes, class count
    vae/                          diffusers VQModel or AutoencoderKL (save_pretrained)
    unet/                         diffusers UNet2DConditionModel, context = one class token
    class_embeddings.safetensors  "embeddings": [num_classes + 1, context_dim]; row
                                  `null_class` is the unconditional (guidance) embedding
The converter (`ld3m prior convert`) and the trainer (`ld3m prior train`) write it; `load_prior`
reads it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ld3m.errors import PriorLayoutError

FORMAT_VERSION = 1
SPEC_FILE = "prior.json"
VAE_DIR = "vae"
UNET_DIR = "unet"
EMBEDDINGS_FILE = "class_embeddings.safetensors"
EMBEDDINGS_KEY = "embeddings"
MODEL_CONFIG = "config.json"
FIX = "create one with `ld3m prior convert` (CompVis checkpoint) or `ld3m prior train`"


@dataclass(frozen=True)
class PriorSpec:
    """Everything about a prior that is not a weight."""

    num_classes: int
    """Conditional classes; the embedding table has one more row (the null class)."""
    null_class: int
    """Row of the unconditional embedding (1000 for cin256-v2)."""
    image_size: int
    """Resolution the autoencoder was trained at (px)."""
    channels: int
    """Image channels (3 RGB, 1 grey)."""
    latent_channels: int
    latent_size: int
    """Latent side length at `image_size`; the downsampling factor is image_size / latent_size."""
    autoencoder: Literal["vq", "kl"]
    scale_factor: float = 1.0
    """Latent = scale_factor * encoder output (1.0 for cin256-v2)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon"] = "epsilon"
    source: str = ""
    """Where the weights came from (checkpoint path, or the dataset it was trained on)."""
    class_names: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def downsampling(self) -> int:
        """Autoencoder downsampling factor f."""
        return self.image_size // self.latent_size


def write_spec(root: Path, spec: PriorSpec) -> None:
    """Write prior.json atomically."""
    root.mkdir(parents=True, exist_ok=True)
    data = {"format_version": FORMAT_VERSION, **dataclasses.asdict(spec)}
    data["class_names"] = list(spec.class_names)
    tmp = root / (SPEC_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, root / SPEC_FILE)


def read_spec(root: Path) -> PriorSpec:
    """Read prior.json, checking its version and fields."""
    path = root / SPEC_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PriorLayoutError(f"prior {root}: {SPEC_FILE} is unreadable ({exc}); {FIX}") from None
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise PriorLayoutError(
            f"prior {root}: {SPEC_FILE} has format_version {version}, "
            f"expected {FORMAT_VERSION}; {FIX}"
        )
    names = {f.name for f in dataclasses.fields(PriorSpec)}
    unknown, missing = (
        set(data) - names,
        {
            f.name
            for f in dataclasses.fields(PriorSpec)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        - set(data),
    )
    if unknown or missing:
        what = (
            f"unknown fields {sorted(unknown)}" if unknown else f"missing fields {sorted(missing)}"
        )
        raise PriorLayoutError(f"prior {root}: {SPEC_FILE} has {what}; {FIX}")
    data["class_names"] = tuple(data.get("class_names", ()))
    return PriorSpec(**data)


def validate_prior_dir(root: Path) -> PriorSpec:
    """Check that `root` is a complete prior directory; return its spec."""
    root = Path(root)
    if not root.is_dir():
        raise PriorLayoutError(f"prior {root} is not a directory (prior.path); {FIX}")
    required = [
        SPEC_FILE,
        f"{VAE_DIR}/{MODEL_CONFIG}",
        f"{UNET_DIR}/{MODEL_CONFIG}",
        EMBEDDINGS_FILE,
    ]
    missing = [name for name in required if not (root / name).is_file()]
    for sub in (VAE_DIR, UNET_DIR):
        folder = root / sub
        if (
            folder.is_dir()
            and not any(folder.glob("*.safetensors"))
            and not any(folder.glob("*.bin"))
        ):
            missing.append(f"{sub}/ weights")
    if missing:
        raise PriorLayoutError(f"prior {root} is missing {', '.join(missing)}; {FIX}")
    spec = read_spec(root)
    if not 0 <= spec.null_class <= spec.num_classes:
        raise PriorLayoutError(
            f"prior {root}: null_class {spec.null_class} is outside 0..{spec.num_classes}; {FIX}"
        )
    return spec

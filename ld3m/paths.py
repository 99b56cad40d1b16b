"""Every name inside a run directory. Only this module spells them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "state.pt"  # the training state inside each checkpoint folder


@dataclass(frozen=True)
class RunPaths:
    """The files and folders of one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def eval_jsonl(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def metrics_jsonl(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def prior(self) -> Path:
        """The prior directory `ld3m prior train` exports."""
        return self.root / "prior"

    @property
    def samples_png(self) -> Path:
        """The final sample grid of `ld3m prior train` (one row per class)."""
        return self.root / "samples.png"

    def distilled_set(self, step: int) -> Path:
        """The synthetic set a distillation exported at `step`."""
        return self.artifact(f"set_{step:06d}")

    def baseline_set(self, ipc: int) -> Path:
        """The random-real baseline set of `ipc` images per class."""
        return self.artifact(f"random_real_ipc{ipc}")

    def artifact(self, name: str) -> Path:
        """A synthetic-set file in artifacts/."""
        return self.artifacts / f"{name}.safetensors"


def run_of_artifact(set_path: Path) -> RunPaths:
    """The run directory that holds a synthetic-set file (its artifacts/ parent, or its folder)."""
    folder = set_path.resolve().parent
    return RunPaths(folder.parent if folder.name == "artifacts" else folder)

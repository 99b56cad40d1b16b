"""One tracker facade: TensorBoard for viewing, `metrics.jsonl` as the durable record.

Training loops call `Tracker.scalar`, `.scalars`, `.images` and never branch on rank: the main
process gets a `Tracker`, every other process a `NullTracker` (`make_tracker`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ld3m.jsonl import append_jsonl, read_jsonl
from ld3m.paths import RunPaths


def image_grid(images01: torch.Tensor, nrow: int, pad: int = 2) -> torch.Tensor:
    """Tile images [N, C, H, W] in [0, 1] into one [C, H', W'] grid, `nrow` images per row."""
    n, c, h, w = images01.shape
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    padded = torch.ones(rows * nrow, c, h + 2 * pad, w + 2 * pad, dtype=images01.dtype)
    padded[:n, :, pad : pad + h, pad : pad + w] = images01.detach().cpu().clamp(0, 1)
    grid = padded.view(rows, nrow, c, h + 2 * pad, w + 2 * pad).permute(2, 0, 3, 1, 4)
    return grid.reshape(c, rows * (h + 2 * pad), nrow * (w + 2 * pad))


def save_png(images01: torch.Tensor, nrow: int, path: Path) -> None:
    """Save images [N, C, H, W] in [0, 1] as one PNG grid of `nrow` columns."""
    tiled = (image_grid(images01, nrow) * 255).round().to(torch.uint8)
    array = tiled[0].numpy() if tiled.shape[0] == 1 else tiled.permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


def purge_jsonl(path: Path, purge_step: int) -> None:
    """Drop records with step >= `purge_step` (work lost before a resume); atomic rewrite."""
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if int(r.get("step", -1)) < purge_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Tracker:
    """Writes scalars to TensorBoard (`RunPaths.tb`) and to `RunPaths.metrics_jsonl`."""

    def __init__(self, run_dir: Path, enabled: bool = True, purge_step: int | None = None) -> None:
        """Open the writers; `purge_step` (on resume) drops records at or after that step."""
        from torch.utils.tensorboard import SummaryWriter

        self.enabled = enabled
        paths = RunPaths(Path(run_dir))
        self.jsonl = paths.metrics_jsonl
        self.writer = None
        if enabled:
            if purge_step is not None:
                purge_jsonl(self.jsonl, purge_step)
            self.writer = SummaryWriter(str(paths.tb), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Record one scalar (e.g. tag 'loss/unet')."""
        self.scalars({tag: value}, step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Record several scalars of one step (one JSONL record per scalar)."""
        if self.writer is None:
            return
        now = time.time()
        records = [
            {"step": step, "tag": tag, "value": float(value), "time": now}
            for tag, value in values.items()
        ]
        for record in records:
            self.writer.add_scalar(record["tag"], record["value"], step)
        append_jsonl(self.jsonl, *records)  # one write and one fsync per step

    def images(self, tag: str, images01: torch.Tensor, step: int, nrow: int) -> None:
        """Record images [N, C, H, W] in [0, 1] as one grid of `nrow` columns."""
        if self.writer is not None:
            self.writer.add_image(tag, image_grid(images01, nrow), step)

    def hparams(self, params: Mapping[str, Any]) -> None:
        """Record the run's hyper-parameters (a flat mapping): as text, and in TensorBoard's
        HPARAMS dashboard (values that are not numbers or strings are shown as strings), so the
        runs of a sweep can be filtered and compared there."""
        if self.writer is None:
            return
        text = "\n".join(f"    {k}: {v}" for k, v in params.items())
        self.writer.add_text("hparams", text, 0)
        clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                 for k, v in params.items()}  # fmt: skip
        self.writer.add_hparams(clean, {}, run_name=".")

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class NullTracker(Tracker):
    """Same methods, does nothing (non-main processes)."""

    def __init__(self, run_dir: Path | None = None, **_: Any) -> None:
        """A tracker that records nothing."""
        self.enabled = False
        self.writer = None


def make_tracker(run_dir: Path, is_main: bool, purge_step: int | None = None) -> Tracker:
    """A `Tracker` on the main process, a `NullTracker` elsewhere."""
    return Tracker(run_dir, purge_step=purge_step) if is_main else NullTracker()

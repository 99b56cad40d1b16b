"""A whole study in one command (`ld3m quickstart`): submit a sweep, wait for it, report.

The study goes through the same sweep and executor path as a cluster study: the real Slurm
when `sbatch` and a responding controller are there, otherwise submitit's local executor.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ld3m.config.io import load_config
from ld3m.hpc.jobs import final_set
from ld3m.hpc.submit import submit_sweep
from ld3m.hpc.sweep import read_manifest
from ld3m.report.tables import report


def detect_executor() -> str:
    """`slurm` when sbatch is installed and sinfo answers with an up partition, else `local`."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "local"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True,
                             timeout=20).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "local"
    return "slurm" if "up" in out.split() else "local"


def run_study(sweep: str, executor: str = "auto", overrides: Sequence[str] = (),
              progress: str = "auto") -> str:  # fmt: skip
    """Run a sweep to the end and return the closing text: results table, set grids, files."""
    how = "chosen"
    if executor == "auto":
        executor = detect_executor()
        how = "Slurm answers" if executor == "slurm" else "no Slurm found"
    print(f"[{sweep}] executor: {executor} ({how}); progress per stage follows",
          flush=True)  # fmt: skip
    root = submit_sweep(sweep, executor, overrides, wait=True, progress=progress)
    out = root / "report"
    written = report([root], out)
    lines = [(out / "results.md").read_text().rstrip() if (out / "results.md").is_file()
             else "(no evaluation records)", "", "synthetic sets (one row per class):"]  # fmt: skip
    lines += [f"  {grid}" for grid in set_grids(root)]
    lines += ["", "tables and plots:"] + [f"  {p}" for p in written]
    lines += ["", f"TensorBoard: tensorboard --logdir {root}"]
    return "\n".join(lines)


def set_grids(root: Path) -> list[Path]:
    """The PNG grid of every run's final synthetic set, in manifest order."""
    grids = []
    for run in read_manifest(root)["runs"]:
        cfg = load_config(Path(run["dir"]) / "config.yaml")
        grid = final_set(cfg, run["kind"]).with_suffix(".png")
        if grid.is_file():
            grids.append(grid)
    return grids

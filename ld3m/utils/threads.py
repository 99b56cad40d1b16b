"""How many CPU threads torch may use in this process."""

from __future__ import annotations

import os

import torch


def configure_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads to `threads` (run.threads); else keep OMP_NUM_THREADS when a
    launcher set it (torchrun, the sbatch templates); else use Slurm's SLURM_CPUS_PER_TASK
    inside a job (torch's default takes every core of the node and oversubscribes it when
    several tasks share one); else leave torch's default. Returns the number in effect."""
    if not threads and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()

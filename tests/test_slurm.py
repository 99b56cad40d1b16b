"""Integration tests against a real Slurm (slurm/local-cluster.sh up; CI starts one).

Skipped, with the reason, where no Slurm controller answers. They submit real jobs:
a tiny sweep (experts -> distill -> eval arrays with dependencies), a submitit job preempted
mid-run that requeues and resumes, and a rendered sbatch script (srun + torchrun, 2 processes)
signalled before its time limit that checkpoints, requeues itself and finishes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from ld3m.checkpoint import CheckpointManager
from ld3m.cli import main
from ld3m.config.io import load_config, save_config
from ld3m.hpc.jobs import StageJob
from ld3m.hpc.status import sweep_status
from ld3m.hpc.submit import submit_sweep
from ld3m.jsonl import read_jsonl
from tests.test_sweep import tiny_overrides, write_sweep


def slurm_up() -> str | None:
    """None when a Slurm controller answers, else why not."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (start one with: sudo bash slurm/local-cluster.sh up)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "UP" not in ping.stdout:
        return "slurmctld does not answer (sudo bash slurm/local-cluster.sh up)"
    return None


pytestmark = pytest.mark.skipif(slurm_up() is not None, reason=str(slurm_up()))
WAIT_S = 600


def queued(job_ids: list[str]) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)],
                         capture_output=True, text=True).stdout  # fmt: skip
    return out.split()


def wait_until_gone(job_ids: list[str], timeout: float = WAIT_S) -> None:
    deadline = time.time() + timeout
    while queued(job_ids):
        assert time.time() < deadline, f"jobs {job_ids} still queued after {timeout} s"
        time.sleep(2)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def slurm_sweep(tmp_path: Path) -> Path:
    return write_sweep(tmp_path, slurm={"time_min": 15, "cpus_per_task": 1, "mem_gb": 2,
                                        "array_parallelism": 8})  # fmt: skip


def test_sweep_runs_as_chained_arrays(tmp_path: Path) -> None:
    start = time.time()
    root = submit_sweep(slurm_sweep(tmp_path), "slurm")
    assert time.time() - start < 60  # returns once queued
    manifest = json.loads((root / "manifest.json").read_text())
    ids = [job for tasks in manifest["tasks"].values() for _, job in tasks]
    dependency = subprocess.run(["scontrol", "show", "job", manifest["tasks"]["eval"][0][1]],
                                capture_output=True, text=True).stdout  # fmt: skip
    assert "Dependency=afterok:" in dependency or "JobState=COMPLETED" in dependency
    wait_until_gone([i.split("_")[0] for i in ids])
    rows = sweep_status(root)
    assert [r.state for r in rows] == ["done"] * 3, rows
    assert all(r.eval_n == 1 for r in rows)


def long_distill_config(tmp_path: Path, iterations: int, save_every: int) -> Path:
    overrides = [
        *tiny_overrides(tmp_path), "distill.objective=dm", f"distill.iterations={iterations}",
        f"distill.save_every={save_every}", f"distill.export_every={iterations}",
        f"run.out_dir={tmp_path / 'run'}", "distill.image_every=100000",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    return path


def steps_logged(run: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["tag"] == "loss/match"]


def test_preempted_submitit_job_requeues_and_resumes(tmp_path: Path) -> None:
    config = long_distill_config(tmp_path, iterations=3000, save_every=100)
    ex = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="slurm", slurm_max_num_timeout=3)
    ex.update_parameters(timeout_min=15, cpus_per_task=1, mem_gb=2, name="ld3m-preempt")
    job = ex.submit(StageJob(), "distill", str(config))
    ckpt = CheckpointManager(tmp_path / "run" / "ckpt")
    wait_for(lambda: len(ckpt.complete(warn=False)) >= 1, 300, "a first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)  # as a preemption
    result = job.result()
    assert result.endswith("set_003000.safetensors")
    stdout = job.stdout() or ""
    assert "resumed from" in (stdout + (job.stderr() or "")), "the requeued job did not resume"
    steps = steps_logged(tmp_path / "run")
    assert steps == sorted(set(steps)) and steps[-1] == 3000  # no step logged twice


def test_rendered_sbatch_checkpoints_requeues_and_finishes(tmp_path: Path, capsys) -> None:
    config = long_distill_config(tmp_path, iterations=2500, save_every=100)
    script = tmp_path / "distill.sbatch"
    args = ["render-sbatch", "distill", "--config", str(config), "-o", str(script),
            "slurm.tasks_per_node=2", "slurm.cpus_per_task=1", "slurm.mem_gb=4",
            "slurm.time_min=15", "slurm.signal_delay_s=60"]  # fmt: skip
    assert main(args) == 0
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True,
                               text=True, check=True, cwd=tmp_path)  # fmt: skip
    job = submitted.stdout.strip().split(";")[0]
    ckpt = CheckpointManager(tmp_path / "run" / "ckpt")
    wait_for(lambda: len(ckpt.complete(warn=False)) >= 1, 300, "a first checkpoint")
    # What Slurm does `signal_delay_s` before the time limit (--signal=B:USR1@...):
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    wait_until_gone([job])
    log = next((tmp_path / "run" / "logs").glob("*.out")).read_text()
    assert "checkpoint and requeue" in log, log[-3000:]
    assert log.count("restart") >= 2, log[-3000:]  # the job ran again after the requeue
    assert "resumed from" in log, log[-3000:]
    assert (tmp_path / "run" / "artifacts" / "set_002500.safetensors").is_file(), log[-3000:]
    steps = steps_logged(tmp_path / "run")
    assert steps == sorted(set(steps)) and steps[-1] == 2500
    assert sys.executable in script.read_text()

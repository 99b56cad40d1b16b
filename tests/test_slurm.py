"""Integration tests against a real Slurm (slurm/local-cluster.sh up; CI starts one).

Skipped, with the reason, where no Slurm controller answers. They submit real jobs:
a tiny sweep (experts -> distill -> eval arrays with dependencies), a submitit job preempted
mid-run that requeues and resumes, and a rendered sbatch script (srun + torchrun, 2 processes)
signalled before its time limit that checkpoints, requeues itself and finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch

from ld3m.artifacts import load_set
from ld3m.checkpoint import CheckpointManager
from ld3m.cli import main
from ld3m.config.io import load_config, save_config
from ld3m.hpc.jobs import StageJob
from ld3m.hpc.status import sweep_status
from ld3m.hpc.submit import submit_sweep
from ld3m.jsonl import read_jsonl
from tests.test_parallel import free_port
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


def test_sweep_runs_as_chained_arrays_and_tabulates(tmp_path: Path, capsys) -> None:
    start = time.time()
    root = submit_sweep(slurm_sweep(tmp_path), "slurm")
    assert time.time() - start < 60  # returns once queued
    manifest = json.loads((root / "manifest.json").read_text())
    ids = [job for tasks in manifest["tasks"].values() for _, job in tasks]
    dependency = subprocess.run(["scontrol", "show", "job", manifest["tasks"]["eval"][0][1]],
                                capture_output=True, text=True).stdout  # fmt: skip
    assert "Dependency=afterok:" in dependency or "JobState=COMPLETED" in dependency
    baseline = subprocess.run(["scontrol", "show", "job", manifest["tasks"]["baseline"][0][1]],
                              capture_output=True, text=True).stdout  # fmt: skip
    assert "Dependency=(null)" in baseline  # random-real sets wait for nothing
    wait_until_gone([i.split("_")[0] for i in ids])
    rows = sweep_status(root)
    assert [r.state for r in rows] == ["done"] * 3, rows
    assert all(r.eval_n == 1 for r in rows)
    capsys.readouterr()
    assert main(["table", str(root)]) == 0
    table = capsys.readouterr().out
    assert "ConvNetD3" in table and "pixel_mtt" in table and "random_real" in table
    # Submitted again with --wait: returns only when its (quick, everything is done) jobs ended.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    assert main(["sweep", str(slurm_sweep(tmp_path)), "--executor", "slurm", "--wait"]) == 0
    manifest = json.loads((root / "manifest.json").read_text())
    again = [job.split("_")[0] for tasks in manifest["tasks"].values() for _, job in tasks]
    assert set(again).isdisjoint(i.split("_")[0] for i in ids) and not queued(again)
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}


def distill_config(tmp_path: Path, name: str, iterations: int, save_every: int) -> Path:
    """A pixel-space DM run long enough to be interrupted, its config written to its run dir."""
    run = tmp_path / name
    overrides = [
        *tiny_overrides(tmp_path), "distill.objective=dm", f"distill.iterations={iterations}",
        f"distill.save_every={save_every}", f"distill.export_every={iterations}",
        f"run.out_dir={run}", "distill.image_every=100000",
    ]  # fmt: skip
    save_config(load_config(None, overrides), run / "config.yaml")
    return run / "config.yaml"


def steps_logged(run: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["tag"] == "loss/match"]


def assert_same_set(a: Path, b: Path) -> None:
    sa, sb = load_set(a), load_set(b)
    assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)


def first_checkpoint(run: Path) -> None:
    ckpt = CheckpointManager(run / "ckpt")
    wait_for(lambda: len(ckpt.complete(warn=False)) >= 1, 300, f"a first checkpoint in {run}")


def test_preempted_two_task_submitit_job_resumes_to_the_same_set(tmp_path: Path) -> None:
    iterations = 1500
    config = distill_config(tmp_path, "preempted", iterations, save_every=50)
    ex = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="slurm", slurm_max_num_timeout=3)
    ex.update_parameters(timeout_min=15, tasks_per_node=2, cpus_per_task=1, mem_gb=4,
                         name="ld3m-preempt")  # fmt: skip
    job = ex.submit(StageJob(), "distill", str(config))
    first_checkpoint(tmp_path / "preempted")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)  # a preemption
    results = job.results()
    assert len(results) == 2  # two data-parallel tasks
    log = (job.paths.stdout.read_text() if job.paths.stdout.exists() else "") + (
        job.paths.stderr.read_text() if job.paths.stderr.exists() else "")  # fmt: skip
    assert "resumed from" in log, log[-3000:]
    steps = steps_logged(tmp_path / "preempted")
    assert steps == sorted(set(steps)) and steps[-1] == iterations  # none logged twice

    # The same 2-rank run without interruption (torchrun) ends with the same set.
    reference = distill_config(tmp_path, "uninterrupted", iterations, save_every=50)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), "-m", "ld3m", "distill", "--config",
                    str(reference)], check=True, env=env, capture_output=True)  # fmt: skip
    name = f"set_{iterations:06d}.safetensors"
    assert_same_set(Path(results[0]), tmp_path / "uninterrupted" / "artifacts" / name)


def test_requeued_sbatch_job_resumes_to_the_same_set(tmp_path: Path) -> None:
    iterations = 2500
    config = distill_config(tmp_path, "requeued", iterations, save_every=100)
    script = tmp_path / "distill.sbatch"
    args = ["render-sbatch", "distill", "--config", str(config), "-o", str(script),
            "slurm.cpus_per_task=1", "slurm.mem_gb=4", "slurm.time_min=15"]  # fmt: skip
    assert main(args) == 0
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True,
                               text=True, check=True, cwd=tmp_path)  # fmt: skip
    job = submitted.stdout.strip().split(";")[0]
    first_checkpoint(tmp_path / "requeued")
    subprocess.run(["scontrol", "requeue", job], check=True)  # SIGTERM now, run again later
    wait_until_gone([job])
    log = next((tmp_path / "requeued" / "logs").glob("*.out")).read_text()
    assert "restart 1" in log and "resumed from" in log, log[-3000:]
    steps = steps_logged(tmp_path / "requeued")
    assert steps == sorted(set(steps)) and steps[-1] == iterations

    reference = distill_config(tmp_path, "uninterrupted", iterations, save_every=100)
    assert main(["distill", "--config", str(reference)]) == 0
    name = f"set_{iterations:06d}.safetensors"
    assert_same_set(tmp_path / "requeued" / "artifacts" / name,
                    tmp_path / "uninterrupted" / "artifacts" / name)  # fmt: skip


def test_sbatch_time_limit_signal_checkpoints_and_requeues(tmp_path: Path) -> None:
    config = distill_config(tmp_path, "limit", 2500, save_every=100)
    script = tmp_path / "distill.sbatch"
    args = ["render-sbatch", "distill", "--config", str(config), "-o", str(script),
            "slurm.cpus_per_task=1", "slurm.mem_gb=4", "slurm.time_min=15"]  # fmt: skip
    assert main(args) == 0
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout.strip().split(";")[0]  # fmt: skip
    first_checkpoint(tmp_path / "limit")
    # What Slurm sends signal_delay_s before the time limit (--signal=B:USR1@...):
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    wait_until_gone([job])
    log = next((tmp_path / "limit" / "logs").glob("*.out")).read_text()
    assert "checkpoint and requeue" in log and "stopped by a signal" in log, log[-3000:]
    assert "restart 1" in log and "resumed from" in log, log[-3000:]
    assert (tmp_path / "limit" / "artifacts" / "set_002500.safetensors").is_file()

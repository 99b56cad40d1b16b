"""The job callables that a sweep submits: one per stage, each given only a config file.

A job never holds state of its own: everything it needs to continue lives in the run directory
(checkpoints, expert shards, eval.jsonl). When Slurm signals a timeout or preemption, submitit
calls `checkpoint()`, which resubmits the same call; the requeued job resumes from the newest
checkpoint on disk. Every stage is also safe to rerun after it finished (it skips done work).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import submitit
import torch

from ld3m.config.io import load_config
from ld3m.config.schema import Config
from ld3m.errors import Interrupted
from ld3m.paths import RunPaths
from ld3m.utils.signals import StopFlag
from ld3m.utils.threads import configure_threads

log = logging.getLogger(__name__)
QUEUE_POLL_S = 1.0  # how often a waiting queue worker looks for a ready task


def job_config(path: str) -> Config:
    """The run's config, with torch's threads set for this job (run.threads or Slurm's)."""
    cfg = load_config(path)
    configure_threads(cfg.run.threads)
    return cfg


def prior_stage(config: str) -> str:
    """Train the prior that the run's prior.path names (skipped when it is already there)."""
    from dataclasses import replace

    from ld3m.prior.train import train_prior

    cfg = job_config(config)
    prior = Path(cfg.prior.path)
    if prior.is_dir():  # written atomically: present means complete
        return str(prior)
    where = RunPaths(prior.parent)
    if where.prior != prior:
        raise ValueError(f"prior.path {prior} is not the prior/ folder of a training run")
    return str(train_prior(replace(cfg, run=replace(cfg.run, out_dir=str(where.root)))))


def hello_stage(config: str) -> str:
    """Train the HeLlO projector that the run's eval.projector names (skipped when present)."""
    from ld3m.data.datasets import load_dataset
    from ld3m.evaluate.hello import PROJECTOR_FILE, train_projector

    cfg = job_config(config)
    out = Path(cfg.eval.projector)
    if (out / PROJECTOR_FILE).is_file():  # written atomically: present means complete
        return str(out / PROJECTOR_FILE)
    return str(train_projector(cfg, load_dataset(cfg.data), out))


def experts_stage(config: str, shard: int, shards: int) -> str:
    """Train shard `shard` of `shards` of the config's expert buffer (skipped when complete)."""
    from ld3m.experts.train import run_expert_shard

    return str(run_expert_shard(job_config(config), shard, shards)[0])


def distill_stage(config: str) -> str:
    """Distil (resuming from the run directory's newest checkpoint); the final set's path."""
    from ld3m.distill.loop import run_distillation

    return str(run_distillation(job_config(config), resume=True))


def baseline_stage(config: str) -> str:
    """Write the random-real baseline set of the run (deterministic; rewriting is harmless)."""
    from ld3m.artifacts import save_set
    from ld3m.baseline import random_real_set
    from ld3m.data.datasets import load_dataset

    cfg = job_config(config)
    path = baseline_path(cfg)
    if path.is_file():
        return str(path)
    synset = random_real_set(load_dataset(cfg.data), cfg.baseline.ipc, cfg.baseline.seed)
    return str(save_set(path, synset))


def baseline_path(cfg: Config) -> Path:
    return RunPaths(Path(cfg.run.out_dir)).baseline_set(cfg.baseline.ipc)


def final_set(cfg: Config, kind: str) -> Path:
    """The synthetic set a finished run leaves for evaluation."""
    if kind == "baseline":
        return baseline_path(cfg)
    return RunPaths(Path(cfg.run.out_dir)).distilled_set(cfg.distill.iterations)


def eval_stage(config: str, kind: str, arch: str, seed: int) -> dict[str, Any]:
    """Train one fresh `arch` network (seed `seed`) on the run's final set; its eval record."""
    from dataclasses import replace

    from ld3m.evaluate.harness import eval_config, evaluate_set

    cfg = job_config(config)
    ecfg = replace(eval_config(cfg), archs=(arch,), seed=seed, runs=1)
    set_path = final_set(cfg, kind)
    out = RunPaths(Path(cfg.run.out_dir)).eval_jsonl
    return evaluate_set(set_path, cfg.data, ecfg, out, "off")[0]


def queue_worker(
    queue: str,
    worker: int,
    tasks: list[tuple[Any, ...]],
    threads: int = 0,
    needs: list[list[int]] | None = None,
) -> int:
    """Run tasks of a shared queue until none is left for this worker; returns how many it ran.

    Several workers get the same task list and claim tasks by creating `claimed/<i>` (atomic
    O_EXCL), so fast workers take more: one process start per worker instead of per task. A
    task is claimed once every task in `needs[i]` (earlier indices) is done; a worker with
    nothing ready waits while some task may still become ready. A requeued worker first
    finishes the tasks it had claimed. Each finished task leaves `done/<i>` (which `ld3m sweep`
    counts for its progress bar), each failed one `failed/<i>`: the tasks that need it are
    skipped, the others go on (this worker too; it raises the first error at the end).
    `threads` > 0 sets torch's threads for tasks whose run.threads is 0 (the machine's cores
    shared among the workers). SIGTERM / SIGUSR1 end the worker after its current task (a
    distillation checkpoints at its next step) with `Interrupted`.
    """
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    root = Path(queue)
    for folder in ("claimed", "done", "failed"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    needs = needs or [[] for _ in tasks]
    ran, first_error = 0, None
    with StopFlag() as stop:  # a stop signal ends the worker between tasks
        while not stop.requested and (i := next_task(root, worker, needs)) is not None:
            if i < 0:
                time.sleep(QUEUE_POLL_S)
                continue
            try:
                STAGES[tasks[i][0]](*tasks[i][1:])
            except Exception as error:  # not SystemExit: a timeout or preemption requeues
                (root / "failed" / str(i)).touch()
                log.exception("task %d %s failed; this worker goes on with the others", i, tasks[i])
                first_error = first_error or error
                continue
            (root / "done" / str(i)).touch()
            ran += 1
    if first_error is not None:
        raise first_error
    if stop.requested:
        raise Interrupted(
            f"queue worker {worker} stopped by a signal after {ran} task(s); "
            "rerun the same command to run the rest"
        )
    return ran


def next_task(root: Path, worker: int, needs: list[list[int]]) -> int | None:
    """The index of the next task `worker` holds (claimed now or before a requeue), -1 when
    none is ready but one may become so, None when nothing is left for this worker."""
    done = {int(p.name) for p in (root / "done").iterdir()}
    blocked = {int(p.name) for p in (root / "failed").iterdir()}
    waiting = False
    for i, reads in enumerate(needs):
        if i in done or i in blocked:
            continue
        if any(j in blocked for j in reads):  # needs point backwards: one pass propagates
            blocked.add(i)
        elif all(j in done for j in reads):
            if claim(root / "claimed" / str(i), worker):
                return i
        else:
            waiting = True
    return -1 if waiting else None


def mark_unfinished_failed(queue: Path, worker: int) -> None:
    """Mark the tasks an ended worker claimed but did not finish as failed (`failed/<i>`)."""
    claimed = queue / "claimed"
    for path in claimed.iterdir() if claimed.is_dir() else ():
        if path.read_text().strip() == str(worker) and not (queue / "done" / path.name).exists():
            (queue / "failed").mkdir(exist_ok=True)
            (queue / "failed" / path.name).touch()


def claim(path: Path, worker: int) -> bool:
    """Claim a task for `worker`: True if this worker now holds it (new, or claimed before)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return path.read_text().strip() == str(worker)
    with os.fdopen(fd, "w") as f:
        f.write(str(worker))
    return True


STAGES = {
    "prior": prior_stage,
    "experts": experts_stage,
    "hello": hello_stage,
    "distill": distill_stage,
    "baseline": baseline_stage,
    "eval": eval_stage,
    "queue": queue_worker,
}


class StageJob(submitit.helpers.Checkpointable):
    """`StageJob()(stage, *args)` runs one stage; on timeout/preemption it is requeued with the
    same arguments and resumes from disk."""

    def __call__(self, stage: str, *args: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        log.info("ld3m %s job: %s", stage, args)
        export_distributed_env()
        return STAGES[stage](*args)


def export_distributed_env() -> None:
    """Inside a submitit job with several tasks, set RANK, WORLD_SIZE, MASTER_ADDR, ... for
    torch.distributed (works for Slurm and the local executor alike)."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export()

"""`ld3m sweep`: expand a sweep file and submit its stages with submitit.

Each stage waits only for the stages it reads from (`Stage.after`): the prior (with
train_prior), the expert buffer shards and the random-real baselines need nothing and start at
once; the HeLlO projectors need the experts; the distillation runs need the prior, the experts
and the projectors; the evaluation tasks (final set x architecture x seed) need everything.
On Slurm (`--executor slurm`) every stage is one job array with `afterok` on the arrays it
needs, and the command returns as soon as everything is queued (or, with wait, when it is
done). The `local` executor runs the stages level by level (a level: the stages whose needs are
met), each level's tasks in one queue shared by `array_parallelism` local worker processes
(`jobs.queue_worker`), and returns when the study is done; `debug` runs every task in this
process, stage after stage (for tests and debugging).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import submitit
from tqdm import tqdm

from ld3m.hpc.jobs import StageJob
from ld3m.hpc.sweep import (
    RunSpec,
    SlurmSpec,
    SweepSpec,
    eval_tasks,
    expand,
    load_sweep,
    sweep_dir,
    write_configs,
    write_manifest,
)
from ld3m.utils.progress import show_progress

log = logging.getLogger(__name__)

EXECUTORS = ("slurm", "local", "debug")
POLL_S = 1.0


@dataclass
class Stage:
    """One array of the study: its name, the argument tuples of its tasks, and the stages whose
    tasks must all have succeeded before any of its own starts."""

    name: str
    tasks: list[tuple[Any, ...]]
    distributed: bool = False  # distillation: nodes x tasks_per_node processes per task
    after: tuple[str, ...] = ()


NEEDS = {  # stage -> the stages it reads from (absent ones are skipped)
    "prior": (),
    "experts": (),
    "baseline": (),
    "hello": ("experts",),
    "distill": ("prior", "experts", "hello"),
    "eval": ("prior", "experts", "hello", "distill", "baseline"),
}


def plan(spec: SweepSpec, runs: list[RunSpec]) -> list[Stage]:
    """The stages of the study in order, each with its task arguments and its needs."""
    stages = []
    if "prior" in spec.stages:
        priors = {r.cfg.prior.path: r for r in runs if r.trains_prior}
        stages.append(Stage("prior", [("prior", str(r.config_path)) for r in priors.values()]))
    if "experts" in spec.stages:
        tasks, seen = [], set()
        for run in runs:
            cfg = run.cfg
            if not run.reads_experts or cfg.experts.dir in seen:
                continue
            seen.add(cfg.experts.dir)
            shards = max(1, min(cfg.experts.num, spec.slurm.array_parallelism))
            tasks += [("experts", str(run.config_path), i, shards) for i in range(shards)]
        stages.append(Stage("experts", tasks))
    if "hello" in spec.stages:
        projectors = {r.cfg.eval.projector: r for r in runs if r.trains_projector}
        stages.append(Stage("hello", [("hello", str(r.config_path)) for r in projectors.values()]))
    if "distill" in spec.stages:
        distill = [("distill", str(r.config_path)) for r in runs if r.kind == "distill"]
        stages.append(Stage("distill", distill, distributed=True))
        baselines = [("baseline", str(r.config_path)) for r in runs if r.kind == "baseline"]
        stages.append(Stage("baseline", baselines))
    if "eval" in spec.stages:
        tasks = [("eval", str(r.config_path), r.kind, arch, seed)
                 for r in runs for arch, seed in eval_tasks(spec, r)]  # fmt: skip
        stages.append(Stage("eval", tasks))
    stages = [s for s in stages if s.tasks]
    present = {s.name for s in stages}
    return [replace(s, after=tuple(n for n in NEEDS[s.name] if n in present)) for s in stages]


def levels(stages: Sequence[Stage]) -> list[list[Stage]]:
    """The stages grouped into levels, in order: a stage joins the level after the latest of
    the stages it needs, so the stages of one level can run side by side."""
    level: dict[str, int] = {}
    for stage in stages:
        level[stage.name] = max((level[n] + 1 for n in stage.after), default=0)
    return [
        [s for s in stages if level[s.name] == i]
        for i in range(max(level.values(), default=-1) + 1)
    ]


def slurm_parameters(slurm: SlurmSpec, stage: Stage, name: str) -> dict[str, Any]:
    """submitit parameters of one stage's array."""
    time_min = {"eval": slurm.eval_time_min, "experts": slurm.experts_time_min}.get(stage.name, 0)
    params: dict[str, Any] = {
        "name": f"{name}-{stage.name}",
        "timeout_min": time_min or slurm.time_min,
        "nodes": slurm.nodes if stage.distributed else 1,
        "tasks_per_node": slurm.tasks_per_node if stage.distributed else 1,
        "cpus_per_task": slurm.cpus_per_task,
        "mem_gb": slurm.mem_gb,
        "slurm_array_parallelism": slurm.array_parallelism,
        "slurm_signal_delay_s": slurm.signal_delay_s,
    }
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node if stage.distributed else 1
    for key, value in (("slurm_partition", slurm.partition), ("slurm_account", slurm.account),
                       ("slurm_qos", slurm.qos)):  # fmt: skip
        if value:
            params[key] = value
    return params


def make_executor(kind: str, folder: Path, spec: SweepSpec, stage: Stage) -> submitit.Executor:
    """An executor for one stage's array."""
    if kind == "debug":
        return submitit.AutoExecutor(folder=folder, cluster="debug")
    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=spec.slurm.max_requeue)
        ntasks = spec.slurm.tasks_per_node if stage.distributed else 1
        ex.update_parameters(timeout_min=spec.slurm.time_min, tasks_per_node=ntasks,
                             signal_delay_s=spec.slurm.signal_delay_s)  # fmt: skip
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm",
                               slurm_max_num_timeout=spec.slurm.max_requeue)  # fmt: skip
    ex.update_parameters(**slurm_parameters(spec.slurm, stage, spec.name))
    return ex


def submit_sweep(path: str | Path, executor: str = "slurm", overrides: Sequence[str] = (),
                 wait: bool = False, progress: str = "auto") -> Path:  # fmt: skip
    """Expand, write every run's config and the manifest, submit; returns the sweep directory.

    `overrides` are added to the sweep's own; `wait` (slurm) returns only when every job ended.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}: use one of {EXECUTORS}")
    spec, spec_dir = load_sweep(path)
    spec = replace(spec, overrides=(*spec.overrides, *overrides))
    runs = expand(spec, spec_dir)
    write_configs(runs)
    root = sweep_dir(spec)
    jobs: dict[str, list[list[Any]]] = {}  # stage -> [[task arguments, job id], ...]
    write_manifest(root, spec, runs, jobs)
    stages = plan(spec, runs)
    queued: list[tuple[Stage, list[submitit.Job]]] = []
    arrays: dict[str, str] = {}  # stage -> its Slurm array's job id
    for group in levels(stages) if executor == "local" else [[s] for s in stages]:
        if executor == "slurm":
            (stage,) = group
            submitted = submit_stage(root, spec, stage, [arrays[n] for n in stage.after])
            arrays[stage.name] = submitted[0].job_id.split("_")[0]
            queued.append((stage, submitted))
            done = [(stage, submitted)]
        else:
            done = run_level(executor, root, spec, group, progress)
        for stage, submitted in done:
            jobs[stage.name] = [
                [list(t), j.job_id] for t, j in zip(stage.tasks, submitted, strict=True)
            ]
            log.info("%s: %d task(s) %s", stage.name, len(submitted),
                     "queued" if executor == "slurm" else "done")  # fmt: skip
        write_manifest(root, spec, runs, jobs)
    if wait:
        for stage, submitted in queued:
            wait_for(stage, submitted, progress)
    return root


def submit_stage(root: Path, spec: SweepSpec, stage: Stage,
                 needs: Sequence[str]) -> list[submitit.Job]:  # fmt: skip
    """Queue one stage's array on Slurm, after the arrays (job ids) it needs."""
    ex = make_executor("slurm", root / "logs" / stage.name, spec, stage)
    if needs:
        ex.update_parameters(
            slurm_additional_parameters={"dependency": "afterok:" + ":".join(needs)}
        )
    return submit_array(ex, stage.tasks)


def run_level(executor: str, root: Path, spec: SweepSpec, group: Sequence[Stage],
              progress: str) -> list[tuple[Stage, list[submitit.Job]]]:  # fmt: skip
    """Local/debug: run the stages of one level until done; per stage, the job of each task.

    Locally the level's tasks share one queue (`logs/<stage>+<stage>/queue`); a distillation
    stage with several processes per task runs in waves of its own.
    """
    waves = [
        s for s in group if executor != "local" or (s.distributed and spec.slurm.tasks_per_node > 1)
    ]
    shared = [s for s in group if s not in waves]
    done: list[tuple[Stage, list[submitit.Job]]] = []
    if shared:
        name = "+".join(s.name for s in shared)
        folder = root / "logs" / name
        tasks = [t for s in shared for t in s.tasks]
        ex = make_executor(executor, folder, spec, shared[0])
        jobs = run_queue(ex, name, tasks, folder / "queue", spec.slurm.array_parallelism, progress)
        for stage in shared:
            done.append((stage, jobs[: len(stage.tasks)]))
            jobs = jobs[len(stage.tasks) :]
    for stage in waves:
        ex = make_executor(executor, root / "logs" / stage.name, spec, stage)
        done.append((stage, run_in_waves(ex, stage.tasks, spec.slurm.array_parallelism)))
    return done


def submit_array(ex: submitit.Executor, tasks: Sequence[tuple[Any, ...]]) -> list[submitit.Job]:
    """One job array (a single job when there is one task)."""
    with ex.batch():
        jobs = [ex.submit(StageJob(), *task) for task in tasks]
    return jobs


def run_in_waves(ex: submitit.Executor, tasks: Sequence[tuple[Any, ...]],
                 width: int) -> list[submitit.Job]:  # fmt: skip
    """Local/debug: run `width` tasks at a time and wait for each wave (errors are raised)."""
    done: list[submitit.Job] = []
    for start in range(0, len(tasks), max(width, 1)):
        wave = [ex.submit(StageJob(), *task) for task in tasks[start : start + width]]
        for job in wave:
            job.result()
        done += wave
    return done


def run_queue(ex: submitit.Executor, name: str, tasks: Sequence[tuple[Any, ...]], queue: Path,
              width: int, progress: str) -> list[submitit.Job]:  # fmt: skip
    """Local: `width` worker processes share the tasks (one process start per worker, not per
    task; never more workers than cores); returns, per task, the job of the worker that ran it."""
    shutil.rmtree(queue, ignore_errors=True)  # claims of an earlier submission
    cores = len(os.sched_getaffinity(0))
    width = max(1, min(width, len(tasks), cores))
    threads = max(1, cores // width)
    workers = [ex.submit(StageJob(), "queue", str(queue), w, list(tasks), threads)
               for w in range(width)]  # fmt: skip
    done = queue / "done"
    with tqdm(total=len(tasks), desc=name, unit="task",
              disable=not show_progress(progress)) as bar:  # fmt: skip
        while not all(w.done() for w in workers):
            time.sleep(POLL_S)
            bar.update(count_files(done) - bar.n)
        bar.update(count_files(done) - bar.n)
    for w in workers:
        w.result()  # raises the first failure, with its traceback
    owner = [int((queue / "claimed" / str(i)).read_text()) for i in range(len(tasks))]
    return [workers[o] for o in owner]


def count_files(folder: Path) -> int:
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def wait_for(stage: Stage, jobs: list[submitit.Job], progress: str) -> None:
    """Block until no task of a queued stage is left in squeue; raise if one failed.

    squeue, not submitit's state, decides: submitit reads states from sacct, which clusters
    without accounting (and the local test Slurm) do not have.
    """
    arrays = sorted({job.job_id.split("_")[0] for job in jobs})
    with tqdm(total=len(jobs), desc=stage.name, unit="task",
              disable=not show_progress(progress)) as bar:  # fmt: skip
        while left := queued_tasks(arrays):
            bar.update(max(len(jobs) - left, 0) - bar.n)
            time.sleep(POLL_S)
        bar.update(len(jobs) - bar.n)
    for job in jobs:
        if not job.paths.result_pickle.exists():
            raise RuntimeError(f"{stage.name} task {job.job_id} ended without a result "
                               f"(killed?); see {job.paths.stderr}")  # fmt: skip
        job.result()  # raises the task's exception, with its traceback


def queued_tasks(job_ids: list[str]) -> int:
    """How many tasks of these jobs (arrays expanded) squeue still lists."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    return len(out.split())

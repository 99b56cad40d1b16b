"""`ld3m sweep`: expand a sweep file and submit its stages with submitit.

Each task waits only for what it reads (`plan`): the prior (with train_prior), the expert
buffer shards and the random-real baselines need nothing and start at once; a HeLlO projector
needs its experts; a distillation run its prior and experts; an evaluation task (final set x
architecture x seed) its run, and for soft labels its teacher or projector. Evaluations are
queued architecture by architecture (`column_major`), so a study cut short has whole columns.
On Slurm (`--executor slurm`) every stage is one job array with `afterok` on the arrays it
needs, and the command returns as soon as everything is queued (or, with wait, when it is
done). The `local` executor puts every task in one queue shared by `array_parallelism` local
worker processes (`jobs.queue_worker`), where each task starts as soon as the tasks it reads
from are done (a pixel-space run does not wait for the prior, an evaluation only for its own
run), and returns when the study is done; `debug` runs every task in this process, stage after
stage (for tests and debugging).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit
from tqdm import tqdm

from ld3m.hpc.jobs import StageJob, mark_unfinished_failed
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
from ld3m.methods import EXPERT_OBJECTIVES, labels_need_teacher
from ld3m.utils.progress import show_progress

log = logging.getLogger(__name__)

EXECUTORS = ("slurm", "local", "debug")
POLL_S = 1.0


@dataclass
class Stage:
    """One array of the study: its name, the argument tuples of its tasks, what each task
    writes (`provides`, a key such as `prior:<path>`; "" for nothing another task reads) and
    the keys each task reads (`reads`), and the stages whose tasks must all have succeeded
    before any of its own starts on Slurm (`after`, derived from the keys)."""

    name: str
    tasks: list[tuple[Any, ...]]
    distributed: bool = False  # distillation: nodes x tasks_per_node processes per task
    provides: list[str] = field(default_factory=list)
    reads: list[tuple[str, ...]] = field(default_factory=list)
    after: tuple[str, ...] = ()

    def add(self, task: tuple[Any, ...], provides: str = "", reads: tuple[str, ...] = ()) -> None:
        self.tasks.append(task)
        self.provides.append(provides)
        self.reads.append(reads)


def plan(spec: SweepSpec, runs: list[RunSpec]) -> list[Stage]:
    """The stages of the study in order, each task with the keys it writes and reads: a prior
    (train_prior), the expert buffers' shards and the random-real baselines read nothing; a
    HeLlO projector reads its experts; a distillation reads its prior and experts; an
    evaluation reads its run's final set and, for soft labels, its teacher or projector."""
    names = ("prior", "experts", "hello", "distill", "baseline", "eval")
    stage = {n: Stage(n, [], distributed=n == "distill") for n in names}
    priors = first_run_per(runs, lambda r: r.cfg.prior.path if r.trains_prior else "")
    for path, run in priors.items():
        stage["prior"].add(("prior", str(run.config_path)), f"prior:{path}")
    buffers = first_run_per(runs, lambda r: r.cfg.experts.dir if r.reads_experts else "")
    for path, run in buffers.items():
        shards = max(1, min(run.cfg.experts.num, spec.slurm.array_parallelism))
        for i in range(shards):
            stage["experts"].add(("experts", str(run.config_path), i, shards), f"experts:{path}")
    projectors = first_run_per(runs, lambda r: r.cfg.eval.projector if r.trains_projector else "")
    for path, run in projectors.items():
        stage["hello"].add(("hello", str(run.config_path)), f"hello:{path}",
                           (f"experts:{run.cfg.experts.dir}",))  # fmt: skip
    for run in runs:
        kind = run.kind  # "distill" or "baseline"
        reads = distill_reads(run) if kind == "distill" else ()
        stage[kind].add((kind, str(run.config_path)), f"run:{run.dir}", reads)
    for run, arch, seed in column_major(spec, runs):
        stage["eval"].add(("eval", str(run.config_path), run.kind, arch, seed),
                          reads=eval_reads(run))  # fmt: skip
    selected = {*spec.stages, *(("baseline",) if "distill" in spec.stages else ())}
    stages = [s for n, s in stage.items() if n in selected and s.tasks]
    makers = {key: s.name for s in stages for key in s.provides if key}
    return [replace(s, after=stage_after(s, makers)) for s in stages]


def column_major(spec: SweepSpec, runs: list[RunSpec]) -> list[tuple[RunSpec, str, int]]:
    """Every evaluation of the sweep as (run, architecture, seed), architecture by architecture
    in the order the sweep first names them, runs in sweep order within one: a study that
    stops early (a local one out of time, a cluster one out of allocation) leaves whole columns
    of its table, every set on ConvNet before any on the costly unseen architectures."""
    evals = [(run, arch, seed) for run in runs for arch, seed in eval_tasks(spec, run)]
    column = {arch: i for i, arch in enumerate(dict.fromkeys(arch for _, arch, _ in evals))}
    return sorted(evals, key=lambda e: column[e[1]])  # stable: sweep order within a column


def first_run_per(runs: list[RunSpec], key: Callable[[RunSpec], str]) -> dict[str, RunSpec]:
    """The first run of each non-empty key (the runs sharing a prior, buffer or projector)."""
    first: dict[str, RunSpec] = {}
    for run in runs:
        if key(run):
            first.setdefault(key(run), run)
    return first


def stage_after(stage: Stage, makers: dict[str, str]) -> tuple[str, ...]:
    """The other stages that write a key some task of `stage` reads, in plan order."""
    after = (makers[k] for reads in stage.reads for k in reads if k in makers)
    return tuple(dict.fromkeys(n for n in after if n != stage.name))


def distill_reads(run: RunSpec) -> tuple[str, ...]:
    """The keys a distillation run reads: the prior the sweep trains, and the expert buffer
    when its objective uses experts (MTT's trajectories, SRe2L's teacher)."""
    reads = (f"prior:{run.cfg.prior.path}",) if run.trains_prior else ()
    uses_experts = run.reads_experts and run.cfg.distill.objective in EXPERT_OBJECTIVES
    return reads + ((f"experts:{run.cfg.experts.dir}",) if uses_experts else ())


def eval_reads(run: RunSpec) -> tuple[str, ...]:
    """The keys an evaluation of a run reads: the run's final set, and for soft labels the
    teacher's expert buffer or the HeLlO projector the sweep trains (and its experts)."""
    cfg = run.cfg
    reads: tuple[str, ...] = (f"run:{run.dir}",)
    if run.reads_experts and (labels_need_teacher(cfg) or run.trains_projector):
        reads += (f"experts:{cfg.experts.dir}",)
    if run.trains_projector:
        reads += (f"hello:{cfg.eval.projector}",)
    return reads


def task_needs(stages: Sequence[Stage]) -> list[list[int]]:
    """Per task of the stages taken together (in order), the earlier tasks it needs: those
    that write a key it reads. Keys no task here writes are already on disk."""
    makers: dict[str, list[int]] = {}
    needs: list[list[int]] = []
    for stage in stages:
        for provides, reads in zip(stage.provides, stage.reads, strict=True):
            needs.append(sorted({j for key in reads for j in makers.get(key, ())}))
            if provides:
                makers.setdefault(provides, []).append(len(needs) - 1)
    return needs


def in_waves(executor: str, spec: SweepSpec, stage: Stage) -> bool:
    """Locally, a stage runs on its own in waves of jobs (not in a shared queue of workers)
    under `debug`, and when it is a distillation with several processes per task."""
    return executor == "debug" or (stage.distributed and spec.slurm.tasks_per_node > 1)


def local_groups(executor: str, spec: SweepSpec, stages: Sequence[Stage]) -> list[list[Stage]]:
    """The groups in which the local executors run the stages, in order: consecutive stages
    share one queue; a stage that runs in waves is a group of its own."""
    groups: list[list[Stage]] = [[]]
    for stage in stages:
        if in_waves(executor, spec, stage):
            groups += [[stage], []]
        else:
            groups[-1].append(stage)
    return [g for g in groups if g]


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
    groups = [[s] for s in stages] if executor == "slurm" else local_groups(executor, spec, stages)
    for group in groups:
        if executor == "slurm":
            (stage,) = group
            submitted = submit_stage(root, spec, stage, [arrays[n] for n in stage.after])
            arrays[stage.name] = submitted[0].job_id.split("_")[0]
            queued.append((stage, submitted))
            done = [(stage, submitted)]
        else:
            done = run_group(executor, root, spec, group, progress)
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


def run_group(executor: str, root: Path, spec: SweepSpec, group: Sequence[Stage],
              progress: str) -> list[tuple[Stage, list[submitit.Job]]]:  # fmt: skip
    """Local/debug: run one group of stages until done; per stage, the job of each task.

    A group's tasks share one queue (`logs/<stage>+<stage>/queue`), each task starting as soon
    as the tasks it needs are done; a stage that runs in waves runs alone.
    """
    if in_waves(executor, spec, group[0]):
        (stage,) = group
        ex = make_executor(executor, root / "logs" / stage.name, spec, stage)
        return [(stage, run_in_waves(ex, stage.tasks, spec.slurm.array_parallelism))]
    name = "+".join(s.name for s in group)
    folder = root / "logs" / name
    tasks = [t for s in group for t in s.tasks]
    ex = make_executor(executor, folder, spec, group[0])
    jobs = run_queue(ex, name, tasks, task_needs(group), folder / "queue",
                     spec.slurm.array_parallelism, progress)  # fmt: skip
    done: list[tuple[Stage, list[submitit.Job]]] = []
    for stage in group:
        done.append((stage, jobs[: len(stage.tasks)]))
        jobs = jobs[len(stage.tasks) :]
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


def run_queue(ex: submitit.Executor, name: str, tasks: Sequence[tuple[Any, ...]],
              needs: Sequence[Sequence[int]], queue: Path, width: int,
              progress: str) -> list[submitit.Job]:  # fmt: skip
    """Local: `width` worker processes share the tasks (one process start per worker, not per
    task; never more workers than cores), each task once the tasks it `needs` are done;
    returns, per task, the job of the worker that ran it. A worker that dies (killed, not by an
    exception of its task) leaves its unfinished tasks marked failed, so nobody waits on them."""
    shutil.rmtree(queue, ignore_errors=True)  # claims of an earlier submission
    cores = len(os.sched_getaffinity(0))
    width = max(1, min(width, len(tasks), cores))
    threads = max(1, cores // width)
    workers = [ex.submit(StageJob(), "queue", str(queue), w, list(tasks), threads, list(needs))
               for w in range(width)]  # fmt: skip
    done, ended = queue / "done", set()
    with tqdm(total=len(tasks), desc=name, unit="task",
              disable=not show_progress(progress)) as bar:  # fmt: skip
        while len(ended) < len(workers):
            time.sleep(POLL_S)
            for w, job in enumerate(workers):
                if w not in ended and job.done():
                    ended.add(w)
                    mark_unfinished_failed(queue, w)
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

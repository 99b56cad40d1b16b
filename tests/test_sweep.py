"""Sweeps: stable expansion, the whole study through submitit's debug executor, status, tables,
and the rendered sbatch templates (golden files)."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from ld3m.cli import main
from ld3m.config.io import presets_dir
from ld3m.errors import ConfigError, Interrupted
from ld3m.hpc import jobs
from ld3m.hpc.status import format_status, sweep_status
from ld3m.hpc.submit import (
    Stage,
    local_groups,
    plan,
    slurm_parameters,
    submit_sweep,
    task_needs,
)
from ld3m.hpc.sweep import SlurmSpec, eval_tasks, expand, grids, load_sweep
from ld3m.utils.signals import StopFlag
from tests.test_datasets import make_tree

GOLDEN = Path(__file__).parent / "golden"


def tiny_overrides(tmp_path: Path) -> list[str]:
    """A 3-class 16 px image folder and budgets that finish in seconds."""
    root = tmp_path / "data"
    if not root.is_dir():
        make_tree(root, n=8, size=(16, 16))
    return [
        "data.name=imagefolder", f"data.root={root}", "data.res=16",
        f"data.cache_dir={tmp_path / 'cache'}", "run.progress=off", "run.threads=1",
        "distill.space=pixel", "distill.ipc=1", "distill.iterations=2", "distill.batch_real=4",
        "distill.arch=ConvNetD3", "distill.save_every=1", "distill.export_every=2",
        "distill.image_every=2", "distill.mtt.syn_steps=2", "distill.mtt.expert_epochs=1",
        "distill.mtt.max_start_epoch=1", "experts.num=2", "experts.epochs=2", "experts.batch=8",
        "experts.arch=ConvNetD3", "eval.epochs=2", "eval.distill_arch=ConvNetD3",
    ]  # fmt: skip


def write_sweep(tmp_path: Path, **extra: object) -> Path:
    spec = {
        "name": "tiny",
        "out_dir": str(tmp_path / "sweeps"),
        "overrides": tiny_overrides(tmp_path),
        "grid": {"distill.objective": ["dm", "mtt"]},
        "baselines": [1],
        "eval": {"archs": ["ConvNetD3", "ConvNetD4"], "seeds": [0]},
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_expansion_is_stable_and_names_runs_by_config(tmp_path: Path) -> None:
    spec, where = load_sweep(write_sweep(tmp_path))
    runs = expand(spec, where)
    again = expand(spec, where)
    assert [r.dir for r in runs] == [r.dir for r in again]
    names = [r.name for r in runs]
    assert names[0].startswith("objective-dm-") and names[1].startswith("objective-mtt-")
    assert names[2].startswith("random-real_ipc-1-") and runs[2].kind == "baseline"
    assert all(len(n.rsplit("-", 1)[1]) == 8 for n in names)  # config hash
    assert runs[0].cfg.experts.dir == "" and "experts" in runs[1].cfg.experts.dir
    assert runs[0].cfg.run.out_dir == str(runs[0].dir)
    changed = load_sweep(write_sweep(tmp_path, overrides=[*spec.overrides, "distill.lr=3"]))
    assert expand(*changed)[0].name != names[0]  # another config, another directory
    # Another evaluation protocol evaluates the same distilled sets (eval.jsonl keys records
    # by protocol), so it keeps the directories.
    reeval = load_sweep(write_sweep(tmp_path, overrides=[*spec.overrides, "eval.lr=0.5"]))
    assert [r.name for r in expand(*reeval)] == names
    stages = plan(spec, runs)
    assert [s.name for s in stages] == ["experts", "distill", "baseline", "eval"]
    assert len(stages[-1].tasks) == 3 * 2  # 3 final sets x 2 architectures x 1 seed


def test_bad_sweep_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'slurm\.partion'"):
        load_sweep(write_sweep(tmp_path, slurm={"partion": "gpu"}))
    with pytest.raises(ConfigError, match=r"grid\.distill\.ipc must be a non-empty list"):
        load_sweep(write_sweep(tmp_path, grid={"distill.ipc": 10}))
    spec, where = load_sweep(write_sweep(tmp_path, grid={"distill.objectiv": ["dm"]}))
    with pytest.raises(ConfigError, match="did you mean 'objective'"):
        expand(spec, where)


def test_slurm_parameters_per_stage() -> None:
    slurm = SlurmSpec(partition="gpu", nodes=2, tasks_per_node=4, gpus_per_node=4, qos="high",
                      time_min=240, eval_time_min=30)  # fmt: skip
    distill = slurm_parameters(slurm, Stage("distill", [], distributed=True), "s")
    assert (distill["nodes"], distill["tasks_per_node"], distill["gpus_per_node"]) == (2, 4, 4)
    assert distill["slurm_partition"] == "gpu" and distill["slurm_qos"] == "high"
    assert "slurm_account" not in distill and distill["timeout_min"] == 240
    ev = slurm_parameters(slurm, Stage("eval", []), "s")
    assert (ev["nodes"], ev["tasks_per_node"], ev["gpus_per_node"], ev["timeout_min"]) == (
        1, 1, 1, 30)  # fmt: skip


def test_debug_executor_runs_the_whole_study(tmp_path: Path, capsys) -> None:
    root = submit_sweep(write_sweep(tmp_path), "debug")
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"experts", "distill", "baseline", "eval"}
    rows = sweep_status(root)
    assert [r.state for r in rows] == ["done"] * 3
    assert all(r.eval_n == 1 and 0 <= r.eval_acc <= 1 for r in rows)
    assert rows[0].step == 2 and rows[0].iterations == 2 and rows[0].loss is not None
    assert "done" in format_status(rows)
    for run in manifest["runs"]:
        lines = (Path(run["dir"]) / "eval.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert sorted(r["arch"] for r in records) == ["ConvNetD3", "ConvNetD4"]
    # A second submission finds everything done: nothing is trained again.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    submit_sweep(write_sweep(tmp_path), "debug")
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    # Another evaluation protocol: the same runs, nothing distilled again, every set evaluated
    # anew; status and table count the current protocol's networks only.
    spec = yaml.safe_load(write_sweep(tmp_path).read_text())
    (tmp_path / "reeval.yaml").write_text(yaml.safe_dump(
        {**spec, "overrides": [*spec["overrides"], "eval.lr=0.002"]}))  # fmt: skip
    assert submit_sweep(tmp_path / "reeval.yaml", "debug") == root
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    for run in manifest["runs"]:
        records = [
            json.loads(x) for x in (Path(run["dir"]) / "eval.jsonl").read_text().splitlines()
        ]
        assert sorted(r["lr"] for r in records if r["arch"] == "ConvNetD4") == [1e-3, 0.002]
        assert len(records) == 4 and len({r["protocol"] for r in records}) == 2
    assert [(r.eval_n, r.state) for r in sweep_status(root)] == [(1, "done")] * 3
    assert main(["status", str(root)]) == 0
    assert main(["table", str(root)]) == 0
    out = capsys.readouterr().out
    for method in ("pixel_dm", "pixel_mtt", "random_real"):
        assert method in out
    assert "±" not in out  # one network per cell: the two protocols are never averaged
    assert (root / "report" / "results.csv").is_file()
    assert (root / "report" / "results.tex").is_file()
    assert (root / "report" / "loss.png").is_file()


def normalise(text: str) -> str:
    return text.replace(str(Path(sys.executable).parent), "{BIN}")


@pytest.mark.parametrize(("template", "extra"), [
    ("distill", ["slurm.partition=gpu", "slurm.nodes=2", "slurm.tasks_per_node=4",
                 "slurm.gpus_per_node=4", "slurm.cpus_per_task=8", "slurm.mem_gb=200",
                 "slurm.time_min=1440", "slurm.account=proj42"]),
    ("experts", ["experts.dir=buffers/imagenette", "experts.num=100", "slurm.time_min=120",
                 "slurm.array_parallelism=20", "slurm.gpus_per_node=1"]),
    ("eval", ["slurm.qos=short", "slurm.eval_time_min=90", "eval.runs=2"]),
])  # fmt: skip
def test_rendered_sbatch_matches_golden(tmp_path: Path, monkeypatch, capsys, template: str,
                                        extra: list[str]) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    args = ["render-sbatch", template, "--config", "ld3m_imagenet128_dm",
            "run.out_dir=runs/imnet128-dm", *extra]  # fmt: skip
    assert main(args) == 0
    text = normalise(capsys.readouterr().out).replace(str(tmp_path), "{CWD}")
    golden = GOLDEN / f"{template}.sbatch"
    if os.environ.get("LD3M_UPDATE_GOLDEN"):  # regenerate, review the diff, commit
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"{golden} is missing; run with LD3M_UPDATE_GOLDEN=1 and review it"
    assert text == golden.read_text()
    assert (tmp_path / "runs" / "imnet128-dm" / "config.yaml").is_file()
    assert (tmp_path / "runs" / "imnet128-dm" / "logs").is_dir()


SHIPPED = [*(Path(__file__).parents[1] / "sweeps").glob("*.yaml"),
           *(presets_dir() / "sweeps").glob("*.yaml")]  # fmt: skip


@pytest.mark.parametrize("path", sorted(SHIPPED), ids=lambda p: p.name)
def test_shipped_sweep_files_expand(path: Path) -> None:
    spec, where = load_sweep(path)
    runs = expand(spec, where)
    points = 0
    for grid in grids(spec):
        combos = 1
        for values in grid.values():
            combos *= len(values)
        points += combos
    assert len(runs) == points + len(spec.baselines)
    assert len({r.name for r in runs}) == len(runs)


def test_queue_workers_share_tasks_and_resume_their_claims(tmp_path: Path, monkeypatch) -> None:
    ran: list[tuple[int, str]] = []
    monkeypatch.setitem(jobs.STAGES, "note", lambda worker, text: ran.append((worker, text)))
    queue = tmp_path / "queue"
    tasks = [("note", 0, "a"), ("note", 0, "b"), ("note", 0, "c")]
    (queue / "claimed").mkdir(parents=True)
    (queue / "claimed" / "1").write_text("1")  # worker 1 holds task 1 (e.g. was preempted)
    assert jobs.queue_worker(str(queue), 0, tasks) == 2
    assert [text for _, text in ran] == ["a", "c"]
    assert sorted(p.name for p in (queue / "done").iterdir()) == ["0", "2"]
    # Worker 1, requeued, finishes its own claim; nothing is left for anyone after that.
    assert jobs.queue_worker(str(queue), 1, tasks) == 1
    assert ran[-1][1] == "b"
    assert jobs.queue_worker(str(queue), 0, tasks) == 0


def test_train_prior_sweep_gives_latent_runs_one_shared_prior(tmp_path: Path) -> None:
    spec, where = load_sweep(write_sweep(tmp_path, train_prior=True,
                                         grid={"distill.space": ["latent", "pixel"],
                                               "distill.objective": ["dm", "mtt"]}))  # fmt: skip
    runs = expand(spec, where)
    latent = [r for r in runs if r.kind == "distill" and r.cfg.distill.space == "latent"]
    others = [r for r in runs if r not in latent]
    assert len(latent) == 2 and all(r.trains_prior for r in latent)
    assert len({r.cfg.prior.path for r in latent}) == 1
    prior = Path(latent[0].cfg.prior.path)
    assert prior.name == "prior" and prior.parent.parent == Path(spec.out_dir) / "tiny" / "priors"
    assert not any(r.trains_prior or r.cfg.prior.path for r in others)
    stages = {s.name: s.tasks for s in plan(spec, runs)}
    assert next(iter(stages)) == "prior" and len(stages["prior"]) == 1
    # Without train_prior, or with a prior.path given, nothing is trained.
    spec, where = load_sweep(write_sweep(tmp_path, grid={"distill.space": ["latent"]}))
    assert "prior" not in {s.name for s in plan(spec, expand(spec, where))}
    given = [*tiny_overrides(tmp_path), "prior.path=/priors/mine"]
    spec, where = load_sweep(write_sweep(tmp_path, train_prior=True, overrides=given,
                                         grid={"distill.space": ["latent"]}))  # fmt: skip
    runs = expand(spec, where)
    assert "prior" not in {s.name for s in plan(spec, runs)}
    assert runs[0].cfg.prior.path == "/priors/mine"


def test_tasks_wait_only_for_what_they_read(tmp_path: Path) -> None:
    spec, where = load_sweep(write_sweep(tmp_path, train_prior=True,
                                         grid={"distill.space": ["latent", "pixel"],
                                               "distill.objective": ["dm", "mtt"]}))  # fmt: skip
    runs = expand(spec, where)
    config = {str(r.config_path): r.cfg for r in runs}
    stages = plan(spec, runs)
    assert {s.name: s.after for s in stages} == {
        "prior": (), "experts": (), "baseline": (), "distill": ("prior", "experts"),
        "eval": ("distill", "baseline"),
    }  # fmt: skip
    tasks = [t for s in stages for t in s.tasks]
    needs = task_needs(stages)
    index = {t: i for i, t in enumerate(tasks)}
    prior = [index[t] for t in stages[0].tasks]
    shards = [index[t] for t in stages[1].tasks]
    for task in stages[2].tasks:  # distill: latent runs need the prior, MTT runs the experts
        cfg = config[task[1]]
        expected = (prior if cfg.distill.space == "latent" else []) + (
            shards if cfg.distill.objective == "mtt" else [])  # fmt: skip
        assert needs[index[task]] == expected, cfg.distill
    for task in stages[-1].tasks:  # an evaluation needs only the task that made its set
        (maker,) = needs[index[task]]
        assert tasks[maker][0] in ("distill", "baseline") and tasks[maker][1] == task[1]
    # Locally everything shares one queue, unless a distillation runs several processes.
    assert [[s.name for s in g] for g in local_groups("local", spec, stages)] == [
        ["prior", "experts", "distill", "baseline", "eval"]]  # fmt: skip
    wide = replace(spec, slurm=replace(spec.slurm, tasks_per_node=2))
    assert [[s.name for s in g] for g in local_groups("local", wide, stages)] == [
        ["prior", "experts"], ["distill"], ["baseline", "eval"]]  # fmt: skip


def test_queue_skips_what_needs_a_failed_task_and_runs_the_rest(tmp_path: Path,
                                                               monkeypatch) -> None:  # fmt: skip
    ran: list[str] = []

    def work(name: str) -> None:
        if name == "bad":
            raise RuntimeError("task failed")
        ran.append(name)

    monkeypatch.setitem(jobs.STAGES, "work", work)
    tasks = [("work", "a"), ("work", "bad"), ("work", "after-bad"), ("work", "after-a")]
    needs = [[], [], [1], [0]]
    queue = tmp_path / "queue"
    with pytest.raises(RuntimeError, match="task failed"):  # raised once the rest ran
        jobs.queue_worker(str(queue), 0, tasks, needs=needs)
    assert ran == ["a", "after-a"] and (queue / "failed" / "1").exists()
    assert not (queue / "claimed" / "2").exists()
    assert jobs.queue_worker(str(queue), 1, tasks, needs=needs) == 0  # nothing left


def test_a_preempted_worker_resumes_its_task_when_requeued(tmp_path: Path, monkeypatch) -> None:
    """submitit's requeue exits the worker (SystemExit) mid-task: that is not a failure; the
    requeued worker (same id) runs the task it holds again, then the rest."""
    ran: list[str] = []

    def work(name: str) -> None:
        if name == "long" and "long" not in ran:
            ran.append("long")
            raise SystemExit(3)  # what submitit's timeout handler does after requeueing
        ran.append(name)

    monkeypatch.setitem(jobs.STAGES, "work", work)
    tasks, needs, queue = [("work", "long"), ("work", "next")], [[], [0]], tmp_path / "queue"
    with pytest.raises(SystemExit):
        jobs.queue_worker(str(queue), 0, tasks, needs=needs)
    assert not (queue / "failed" / "0").exists()
    assert jobs.queue_worker(str(queue), 0, tasks, needs=needs) == 2
    assert ran == ["long", "long", "next"]


def test_a_stop_signal_ends_the_worker_after_its_task(tmp_path: Path, monkeypatch) -> None:
    """SIGTERM during a task that still ends normally (a run at its last step, whose own
    StopFlag heard it) stops the worker before it claims the next task."""
    ran: list[str] = []

    def work(name: str) -> None:
        with StopFlag() as inner:
            if name == "a" and not ran:
                os.kill(os.getpid(), signal.SIGTERM)
            assert inner.requested == (name == "a" and not ran)
        ran.append(name)

    monkeypatch.setitem(jobs.STAGES, "work", work)
    tasks, queue = [("work", "a"), ("work", "b")], tmp_path / "queue"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="rerun the same command"):
        jobs.queue_worker(str(queue), 0, tasks)
    assert ran == ["a"] and sorted(p.name for p in (queue / "done").iterdir()) == ["0"]
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    assert jobs.queue_worker(str(queue), 0, tasks) == 1  # the rerun runs the rest
    assert ran == ["a", "b"]


def test_queue_waits_for_a_needed_task_another_worker_runs(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    for folder in ("claimed", "done", "failed"):
        (queue / folder).mkdir(parents=True)
    (queue / "claimed" / "0").write_text("1")  # worker 1 runs task 0
    assert jobs.next_task(queue, 0, [[], [0]]) == -1  # task 1 needs it: wait
    assert jobs.next_task(queue, 0, [[], []]) == 1
    (queue / "done" / "0").touch()
    assert jobs.next_task(queue, 0, [[], [0]]) == 1  # still held by worker 0 (a requeue)
    (queue / "done" / "1").touch()
    # Worker 1 dies holding task 2: its unfinished claims fail, so nobody waits on them.
    (queue / "claimed" / "2").write_text("1")
    jobs.mark_unfinished_failed(queue, 1)
    assert sorted(p.name for p in (queue / "failed").iterdir()) == ["2"]
    assert jobs.next_task(queue, 0, [[], [0], [], [2]]) is None


def test_unknown_shipped_sweep_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="quickstart"):
        load_sweep("no-such-sweep")


def test_a_list_of_grids_joins_their_runs(tmp_path: Path) -> None:
    grid = [{"distill.objective": ["dm", "mtt"]},
            {"distill.objective": ["dm"], "distill.space": ["latent"]}]  # fmt: skip
    spec, where = load_sweep(write_sweep(tmp_path, grid=grid, baselines=[]))
    names = [r.name.rsplit("-", 1)[0] for r in expand(spec, where)]
    assert names == ["objective-dm", "objective-mtt", "objective-dm_space-latent"]
    duplicate = [{"distill.objective": ["dm"]}, {"distill.objective": ["dm"]}]
    spec, where = load_sweep(write_sweep(tmp_path, grid=duplicate))
    with pytest.raises(ConfigError, match="same config"):
        expand(spec, where)


def test_more_architectures_only_for_the_named_methods_and_ipcs(tmp_path: Path) -> None:
    more = [{"methods": ["pixel_dm", "random_real"], "ipcs": [1], "archs": ["ConvNetD4", "MLP"]}]
    spec, where = load_sweep(write_sweep(tmp_path, eval={"archs": ["ConvNetD3"], "seeds": [0],
                                                         "more": more}))  # fmt: skip
    runs = expand(spec, where)
    tasks = {r.name.split("-")[1]: eval_tasks(spec, r) for r in runs}
    assert tasks["dm"] == [("ConvNetD3", 0), ("ConvNetD4", 0), ("MLP", 0)]
    assert tasks["mtt"] == [("ConvNetD3", 0)]  # pixel_mtt is not named
    assert tasks["real_ipc"] == [("ConvNetD3", 0), ("ConvNetD4", 0), ("MLP", 0)]
    # Queued column by column: every set on ConvNetD3 before any on the extra architectures.
    (stage,) = [s for s in plan(spec, runs) if s.name == "eval"]
    queued = [(Path(task[1]).parent.name.split("-")[1], task[3]) for task in stage.tasks]
    assert queued == [("dm", "ConvNetD3"), ("mtt", "ConvNetD3"), ("real_ipc", "ConvNetD3"),
                      ("dm", "ConvNetD4"), ("real_ipc", "ConvNetD4"),
                      ("dm", "MLP"), ("real_ipc", "MLP")]  # fmt: skip
    with pytest.raises(ConfigError, match=r"unknown config key 'eval\.more\.arch'"):
        load_sweep(write_sweep(tmp_path, eval={"more": [{"arch": ["MLP"]}]}))


def test_teacher_runs_and_soft_label_baselines_get_an_expert_buffer(tmp_path: Path) -> None:
    """SRe2L distillations read their teacher, and soft-label evaluations (of baselines too)
    theirs, from an expert buffer the experts stage trains."""
    overrides = [*tiny_overrides(tmp_path), "experts.arch=ConvNetBN", "eval.labels=teacher"]
    spec, where = load_sweep(write_sweep(tmp_path, overrides=overrides,
                                         grid={"distill.objective": ["sre2l", "dm"]}))  # fmt: skip
    runs = expand(spec, where)
    assert len({r.cfg.experts.dir for r in runs}) == 1 and runs[0].cfg.experts.dir
    assert runs[2].kind == "baseline" and runs[2].cfg.experts.dir == runs[0].cfg.experts.dir
    stages = {s.name: s.tasks for s in plan(spec, runs)}
    assert len(stages["experts"]) == 2  # one buffer (2 experts -> 2 shards), trained once
    # The DM run distils without its experts; its soft-label evaluation waits for the teacher.
    stage = {s.name: s for s in plan(spec, runs)}
    teacher = f"experts:{runs[0].cfg.experts.dir}"
    distill = dict(zip(stage["distill"].tasks, stage["distill"].reads, strict=True))
    assert teacher in distill[("distill", str(runs[0].config_path))]  # sre2l reads its teacher
    assert teacher not in distill[("distill", str(runs[1].config_path))]  # dm does not
    assert all(teacher in reads for reads in stage["eval"].reads)
    hard = [*tiny_overrides(tmp_path), "experts.arch=ConvNetBN"]
    spec, where = load_sweep(write_sweep(tmp_path, overrides=hard,
                                         grid={"distill.objective": ["dm"]}))  # fmt: skip
    stages = {s.name: s.tasks for s in plan(spec, expand(spec, where))}
    assert not stages.get("experts")  # hard labels, no teacher: no experts


def test_run_names_depend_only_on_non_default_settings(tmp_path: Path) -> None:
    """A setting at its default (e.g. one ld3m adds later) leaves every run directory as it was."""
    spec, where = load_sweep(write_sweep(tmp_path))
    same = [*spec.overrides, "distill.dcc.warmup=0.25", "eval.labels=hard"]  # both defaults
    other = [*spec.overrides, "distill.dcc.warmup=0.5"]
    names = [r.name for r in expand(spec, where)]
    assert [r.name for r in expand(*load_sweep(write_sweep(tmp_path, overrides=same)))] == names
    assert [r.name for r in expand(*load_sweep(write_sweep(tmp_path, overrides=other)))] != names


def test_debug_executor_runs_an_sre2l_study_under_the_teacher_protocol(
    tmp_path: Path, capsys
) -> None:
    """Teacher (a BN expert) -> SRe2L and CDA recover -> random-real -> soft-label evaluation
    of every set -> `+teacher` table rows, end to end."""
    overrides = [*tiny_overrides(tmp_path), "experts.arch=ConvNetBN", "experts.num=1",
                 "distill.objective=sre2l", "distill.optimizer=adam", "distill.init=noise",
                 "eval.labels=teacher"]  # fmt: skip
    path = write_sweep(tmp_path, overrides=overrides, eval={"archs": ["ConvNetD3"], "seeds": [0]},
                       grid={"distill.sre2l.curriculum": ["none", "cosine"]})  # fmt: skip
    root = submit_sweep(path, "debug")
    records = [json.loads(line) for run in json.loads((root / "manifest.json").read_text())["runs"]
               for line in (Path(run["dir"]) / "eval.jsonl").read_text().splitlines()]  # fmt: skip
    assert len(records) == 3 and {r["labels"] for r in records} == {"teacher"}
    assert {r["method"] for r in records} == {"pixel_sre2l", "pixel_cda", "random_real"}
    assert main(["table", str(root)]) == 0
    out = capsys.readouterr().out
    for row in ("pixel_sre2l+teacher", "pixel_cda+teacher", "random_real+teacher"):
        assert row in out

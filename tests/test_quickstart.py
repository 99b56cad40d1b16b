"""`ld3m quickstart`: the shipped study through submitit's local executor, with tiny budgets:
the prior is trained once, every method and IPC ends up in the table, and a second call reuses
everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ld3m.cli import main
from ld3m.hpc.study import detect_executor

TINY = [
    "prior_train.ae_channels=[8,16]", "prior_train.latent_channels=2", "prior_train.ae_steps=6",
    "prior_train.ae_batch=16", "prior_train.unet_channels=[16,32]", "prior_train.unet_steps=6",
    "prior_train.unet_attention=[false,true]", "prior_train.norm_groups=8",
    "prior_train.context_dim=16", "prior_train.heads=2", "prior_train.unet_batch=16",
    "prior_train.warmup_steps=2", "prior_train.sample_steps=2", "prior_train.grid_per_class=2",
    "prior_train.quality_per_class=0", "generator.steps=2", "experts.num=2", "experts.epochs=2",
    "distill.iterations=2", "distill.batch_real=8", "distill.save_every=1",
    "distill.export_every=2", "distill.image_every=2", "distill.mtt.syn_steps=2",
    "distill.mtt.expert_epochs=1", "distill.mtt.max_start_epoch=1", "eval.epochs=1",
    "run.progress='off'",
]  # fmt: skip
ROWS = [("ld3m_dm", 1), ("ld3m_dm", 10), ("ld3m_mtt", 1), ("ld3m_mtt", 10), ("pixel_dm", 1),
        ("pixel_dm", 10), ("pixel_mtt", 1), ("pixel_mtt", 10), ("random_real", 1),
        ("random_real", 10)]  # fmt: skip


def test_quickstart_runs_the_whole_study_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = [*TINY, f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["quickstart", "--executor", "local", *overrides]) == 0
    out = capsys.readouterr().out
    root = Path("runs/quickstart")
    table = (root / "report" / "results.md").read_text()
    assert table.strip() in out
    for method, ipc in ROWS:
        assert any(f"| {method} " in line and f" {ipc} " in line for line in table.splitlines()), (
            method, ipc)  # fmt: skip
    for arch in ("ConvNet", "AlexNet", "VGG11", "ResNet18", "ViT", "unseen mean"):
        assert arch in table.splitlines()[0]
    assert f"tensorboard --logdir {root}" in out
    assert out.count(".png") >= len(ROWS)  # one grid per synthetic set, plus the plots
    priors = list((root / "priors").iterdir())
    assert len(priors) == 1 and (priors[0] / "prior" / "prior.json").is_file()
    tasks = json.loads((root / "manifest.json").read_text())["tasks"]
    assert set(tasks) == {"prior", "experts", "distill", "baseline", "eval"}
    # Every task (1 prior, 2 expert shards, 8 runs, 2 baselines, 50 evaluations) went through
    # one queue, each starting once what it reads was done.
    queue = root / "logs" / "prior+experts+distill+baseline+eval" / "queue"
    assert len(list((queue / "done").iterdir())) == 1 + 2 + 8 + 2 + 5 * len(ROWS)
    assert len(tasks["eval"]) == 5 * len(ROWS)
    # A second call trains nothing again and prints the same table.
    sets = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    assert main(["quickstart", "--executor", "local", *overrides]) == 0
    assert table.strip() in capsys.readouterr().out
    assert sets == {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}


def test_executor_is_local_without_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert detect_executor() == "local"

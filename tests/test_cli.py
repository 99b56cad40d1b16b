"""The `ld3m` command: help, one-line errors, baseline -> eval through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ld3m.cli import main


def test_help_lists_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ld3m", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("baseline", "eval", "quickstart"):
        assert command in out


def test_config_error_is_one_line_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["baseline", "eval.epoch=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("ld3m: error: unknown config key 'eval.epoch'")


def test_missing_dataset_root_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["baseline", "data.name=cifar10", f"data.root={tmp_path / 'nope'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "mnist5k" in err


def test_baseline_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    common = [f"run.out_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "data.res=16"]
    assert main(["baseline", "baseline.ipc=2", *common]) == 0
    set_path = run / "artifacts" / "random_real_ipc2.safetensors"
    assert set_path.is_file() and set_path.with_suffix(".png").is_file()
    assert (run / "config.yaml").is_file()
    args = ["eval", str(set_path), "eval.archs=[ConvNet]", "eval.epochs=2", "eval.runs=1", *common]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ConvNet" in out and "records:" in out
    record = json.loads((run / "eval.jsonl").read_text().splitlines()[0])
    assert record["arch"] == "ConvNet" and record["epochs"] == 2 and record["ipc"] == 2


def test_threads_follow_config_then_launcher_then_slurm(monkeypatch) -> None:
    import torch

    from ld3m.utils.threads import configure_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
        assert configure_threads(0) == 3
        assert configure_threads(2) == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert configure_threads(0) == 1  # the launcher's choice stays
    finally:
        torch.set_num_threads(before)

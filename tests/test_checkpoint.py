"""The reusable run pieces: atomic checkpoints (save, torn folders, fallback, pruning) and the
tracker (TensorBoard + metrics.jsonl)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ld3m.checkpoint import CheckpointManager, write_dir_atomic
from ld3m.errors import CheckpointError
from ld3m.jsonl import read_jsonl
from ld3m.paths import RunPaths
from ld3m.tracking import NullTracker, Tracker


def write_value(value: int) -> Callable[[Path], int]:
    """A write_fn storing `value` in value.txt."""
    return lambda folder: (folder / "value.txt").write_text(str(value))


def read_value(folder: Path) -> int:
    return int((folder / "value.txt").read_text())


def test_save_is_atomic_and_marked(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt")
    folder = mgr.save(7, write_value(7))
    assert folder.name == "step_00000007" and (folder / "COMPLETE").is_file()
    assert sorted(p.name for p in mgr.root.iterdir()) == ["step_00000007"]  # no .tmp left
    assert mgr.load_latest(read_value) == 7


def test_failed_write_leaves_previous_checkpoint(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, write_value(1))

    def crash(folder: Path) -> None:
        (folder / "value.txt").write_text("half")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, crash)
    assert mgr.latest() == mgr.path(1)
    assert mgr.load_latest(read_value) == 1


def test_torn_folders_are_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(3, write_value(3))
    (mgr.root / "step_00000009.tmp").mkdir()  # crash before the rename
    unmarked = mgr.root / "step_00000008"  # crash between rename and marker
    unmarked.mkdir()
    (unmarked / "value.txt").write_text("8")
    with caplog.at_level(logging.WARNING):
        assert mgr.latest() == mgr.path(3)
        assert mgr.load_latest(read_value) == 3
    assert "step_00000008" in caplog.text and "step_00000009.tmp" in caplog.text


def test_corrupt_marked_checkpoint_falls_back(tmp_path: Path, caplog) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, write_value(1))
    mgr.save(2, write_value(2))
    (mgr.path(2) / "value.txt").write_text("garbage")
    with caplog.at_level(logging.WARNING):
        assert mgr.load_latest(read_value) == 1
    assert "step_00000002" in caplog.text


def test_nothing_loads_is_one_line_error(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, write_value(1))
    mgr.save(2, write_value(2))
    for step in (1, 2):
        (mgr.path(step) / "value.txt").unlink()
    with pytest.raises(CheckpointError) as info:
        mgr.load_latest(read_value)
    message = str(info.value)
    assert "\n" not in message
    assert "step_00000002" in message and "--no-resume" in message and "aside" in message


def test_no_checkpoint_loads_nothing(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt")
    assert mgr.latest() is None and mgr.load_latest(read_value) is None


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_pruning_keeps_at_least_two(tmp_path: Path, keep: int) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt", keep=keep)
    for step in range(1, 6):
        mgr.save(step, write_value(step))
    kept = [step for step, _ in mgr.complete()]
    assert kept == list(range(6 - max(keep, 2), 6))


def test_pruning_waits_for_a_complete_save(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt", keep=2)
    mgr.save(1, write_value(1))
    mgr.save(2, write_value(2))
    with pytest.raises(RuntimeError):
        mgr.save(3, lambda folder: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert [step for step, _ in mgr.complete()] == [1, 2]


def test_resaving_a_step_and_reset(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(4, write_value(4))
    mgr.save(4, write_value(40))
    assert mgr.load_latest(read_value) == 40
    mgr.reset()
    assert mgr.latest() is None


def test_write_dir_atomic_replaces(tmp_path: Path) -> None:
    target = tmp_path / "prior"
    write_dir_atomic(target, write_value(1))
    write_dir_atomic(target, write_value(2))
    assert read_value(target) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior"]


def test_tracker_writes_tensorboard_and_jsonl(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path)
    tracker.scalar("loss/train", 0.5, 1)
    tracker.scalars({"loss/train": 0.25, "lr": 1e-3}, 2)
    tracker.images("samples", torch.rand(6, 1, 8, 8), 2, nrow=3)
    tracker.hparams({"lr": 1e-3, "archs": ("ConvNet", "ViT"), "name": "dm"})
    tracker.close()
    acc = EventAccumulator(str(RunPaths(tmp_path).tb), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/train")] == [(1, 0.5), (2, 0.25)]
    image = acc.Images("samples")[0]
    assert (image.width, image.height) == (3 * 12, 2 * 12)  # 3 x 2 grid with 2 px padding
    records = list(read_jsonl(RunPaths(tmp_path).metrics_jsonl))
    assert [(r["step"], r["tag"], r["value"]) for r in records] == [
        (1, "loss/train", 0.5),
        (2, "loss/train", 0.25),
        (2, "lr", 1e-3),
    ]
    assert all("time" in r for r in records)
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(RunPaths(tmp_path).tb), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert info.hparams["lr"].number_value == 1e-3
    assert info.hparams["archs"].string_value == "('ConvNet', 'ViT')"


def test_tracker_resume_purges_lost_steps(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path)
    for step in range(1, 5):
        tracker.scalar("loss", float(step), step)
    tracker.close()
    Tracker(tmp_path, purge_step=3).close()  # resumed from the checkpoint of step 2
    steps = [r["step"] for r in read_jsonl(RunPaths(tmp_path).metrics_jsonl)]
    assert steps == [1, 2]


def test_null_tracker_does_nothing(tmp_path: Path) -> None:
    tracker = NullTracker(tmp_path)
    tracker.scalar("loss", 1.0, 1)
    tracker.images("x", torch.rand(1, 1, 4, 4), 1, nrow=1)
    tracker.close()
    assert not any(tmp_path.iterdir())

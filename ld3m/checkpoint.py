"""Atomic, self-pruning training checkpoints. Only this module names the checkpoint folders.

A checkpoint is a folder `step_XXXXXXXX/` under the manager's root. It is written as
`step_XXXXXXXX.tmp/`, fsynced, renamed into place, and only then marked with a `COMPLETE` file.
A folder without the marker (a crash mid-save) is never loaded. Older complete checkpoints are
pruned only after a new one is complete, keeping at least two.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ld3m.errors import CheckpointError

log = logging.getLogger(__name__)

T = TypeVar("T")

MARKER = "COMPLETE"
TMP_SUFFIX = ".tmp"
STEP_DIR = re.compile(r"^step_(\d{8})$")
MIN_KEEP = 2


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folder entries themselves."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Flush a directory's entries (renames, new files) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomic(final: Path, write_fn: Callable[[Path], object]) -> Path:
    """Write a directory via `write_fn(tmp)` into `final.tmp`, fsync, then swap it into place."""
    tmp = fresh_tmp_dir(Path(final))
    write_fn(tmp)
    return swap_into_place(tmp, Path(final))


def fresh_tmp_dir(final: Path) -> Path:
    """An empty `final.tmp` folder (whatever was there before is removed)."""
    tmp = final.with_name(final.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_into_place(tmp: Path, final: Path) -> Path:
    """fsync `tmp`, then rename it to `final` (replacing an older `final`)."""
    old = final.with_name(final.name + ".old")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointManager:
    """Saves into `root/step_XXXXXXXX/` atomically and finds the newest complete one."""

    def __init__(self, root: Path, keep: int = MIN_KEEP) -> None:
        """Manage checkpoints under `root`, keeping the newest `max(keep, 2)` complete ones."""
        self.root = Path(root)
        self.keep = max(int(keep), MIN_KEEP)

    def path(self, step: int) -> Path:
        """The folder of the checkpoint of `step`."""
        return self.root / f"step_{step:08d}"

    def save(self, step: int, write_fn: Callable[[Path], None]) -> Path:
        """Write a checkpoint via `write_fn(tmp_dir)`, rename it into place, mark it, prune."""
        return self.save_collective(step, write_fn, True, lambda: None)

    def save_collective(
        self, step: int, write_fn: Callable[[Path], None], is_main: bool,
        barrier: Callable[[], None],
    ) -> Path:  # fmt: skip
        """`save` with several processes writing into one folder: the main process prepares
        and finishes it, every process calls `write_fn(tmp_dir)` in between."""
        final = self.path(step)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if is_main:
            fresh_tmp_dir(final)
        barrier()
        write_fn(tmp)
        barrier()
        if is_main:
            self._finish(step, tmp, final)
        barrier()
        return final

    def _finish(self, step: int, tmp: Path, final: Path) -> None:
        """Rename a written checkpoint into place, mark it complete, prune older ones."""
        swap_into_place(tmp, final)
        marker = final / MARKER
        with open(marker, "w") as fh:
            fh.write(f"{step}\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(final)
        _fsync_dir(self.root)
        self._prune()

    def complete(self, warn: bool = True) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, folder), oldest first; torn folders are warned about."""
        if not self.root.is_dir():
            return []
        found = []
        for child in sorted(self.root.iterdir()):
            match = STEP_DIR.match(child.name)
            if match and (child / MARKER).is_file():
                found.append((int(match.group(1)), child))
            elif warn and (match or child.name.endswith(TMP_SUFFIX)):
                log.warning("ignoring incomplete checkpoint %s (no %s marker)", child, MARKER)
        return found

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        found = self.complete()
        return found[-1][1] if found else None

    def load_latest(self, load_fn: Callable[[Path], T]) -> T | None:
        """`load_fn(folder)` of the newest checkpoint that loads; None when there is none."""
        found = self.complete()
        if not found:
            return None
        failures = []
        for _, folder in reversed(found):
            try:
                return load_fn(folder)
            except Exception as exc:  # any failure to read a checkpoint means: try the previous
                cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                failures.append((folder, cause))
                log.warning(
                    "checkpoint %s does not load (%s); trying the previous one", folder, cause
                )
        folder, cause = failures[0]
        raise CheckpointError(
            f"no checkpoint under {self.root} loads (newest {folder.name}: {cause}); move "
            f"{self.root} aside to start over, or pass --no-resume"
        )

    def reset(self) -> None:
        """Delete every checkpoint (for a deliberate fresh start, `--no-resume`)."""
        if self.root.is_dir():
            log.warning("--no-resume: deleting the checkpoints in %s", self.root)
            shutil.rmtree(self.root)

    def _prune(self) -> None:
        """Delete complete checkpoints older than the newest `keep`, and older torn folders."""
        found = self.complete(warn=False)
        for _, folder in found[: -self.keep]:
            shutil.rmtree(folder, ignore_errors=True)
        newest = found[-1][0] if found else -1
        for child in self.root.iterdir():
            match = STEP_DIR.match(child.name.removesuffix(TMP_SUFFIX))
            torn = child.name.endswith(TMP_SUFFIX) or not (child / MARKER).is_file()
            if match and torn and int(match.group(1)) < newest:
                shutil.rmtree(child, ignore_errors=True)

"""Progress bars that stay quiet in batch logs."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Literal, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

ProgressMode = Literal["auto", "on", "off"]


def show_progress(mode: ProgressMode = "auto") -> bool:
    """Whether to draw bars: `auto` draws them only when stderr is a terminal (not a Slurm log)."""
    if mode == "auto":
        return sys.stderr.isatty()
    return mode == "on"


def progress(
    items: Iterable[T], mode: ProgressMode = "auto", desc: str = "", total: int | None = None
) -> Iterator[T]:
    """Iterate `items` with a tqdm bar when `show_progress(mode)`, plainly otherwise."""
    return iter(tqdm(items, desc=desc, total=total, disable=not show_progress(mode), leave=False))

"""JSON-lines records: the durable record of metrics and evaluations that tools/ read."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def append_jsonl(path: Path, *records: dict[str, Any]) -> None:
    """Append records, one line each, in a single write call flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
    with open(path, "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # array tasks append to one run's eval.jsonl together
        try:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the records of `path`; a torn last line (crash mid-write) is skipped with a warning."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping unreadable line %d of %s", number, path)

"""Error types. The CLI prints an `Ld3mError` as one line (no traceback unless --debug).

Every message says what is wrong, where it came from, and how to fix it.
"""

from __future__ import annotations


class Ld3mError(Exception):
    """Base class of every error that ld3m reports to the user as one line."""


class ConfigError(Ld3mError):
    """Unknown key, wrong type or invalid value in a config file or override."""


class DataError(Ld3mError):
    """Missing, malformed or mismatched dataset."""


class PriorLayoutError(Ld3mError):
    """A directory that is not a valid ld3m prior."""


class CheckpointError(Ld3mError):
    """A checkpoint or artifact that cannot be read."""


class TrainingError(Ld3mError):
    """Training diverged (NaN or inf loss) or cannot continue."""


class Interrupted(Ld3mError):
    """Stopped by a signal (time limit, preemption) after saving a checkpoint; rerun to resume."""

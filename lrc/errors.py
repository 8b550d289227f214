"""Errors lrc raises for bad input. The CLI turns each into one line and a non-zero exit."""

from __future__ import annotations

import errno

# the system's refusals of a write (a full disk or quota, a read-only or forbidden place), not a bug in lrc
DISK_REFUSALS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


class LrcError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line."""

    exit_code = 2


class ModelLoadError(LrcError):
    """The model could not be found, read or understood."""


class ConfigError(LrcError):
    """A setting, flag or recipe is invalid."""


class CalibrationError(LrcError):
    """The calibration data is missing, unreadable or too short."""


class OutputError(LrcError):
    """The output location cannot be used."""


class QualityError(LrcError):
    """The compressed model fails the held-out quality check (see lrc.quality_check)."""


class NumericalError(LrcError):
    """A weight or statistic is not finite, or a factorization failed."""

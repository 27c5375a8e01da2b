"""User-facing errors.

Every error a user can fix (a bad path, a missing checkpoint, a malformed dataset) is raised as a
:class:`ClipSamError` subclass whose message names the file or config key and says what to do.
The command line prints such errors as one line (``clipsam: error: ...``) without a traceback and
exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ClipSamError", "ConfigError", "DatasetError", "WeightsError"]


class ClipSamError(Exception):
    """Base class of errors the user can fix; the message says how."""


class ConfigError(ClipSamError, ValueError):
    """A config value is invalid (wrong choice, inconsistent keys)."""


class DatasetError(ClipSamError, ValueError):
    """A dataset on disk is missing, malformed or inconsistent with its masks."""


class WeightsError(ClipSamError, RuntimeError):
    """Model weights or a checkpoint cannot be found, downloaded or loaded."""

"""Importing a registered part (a method or a refiner) by its module path, with clear errors."""

from __future__ import annotations

import importlib
from typing import Any

from clipsam.errors import ConfigError

__all__ = ["import_attr", "optional_attr"]


def _module(module: str, *, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:  # the module exists but one of its own imports is missing
            raise
        raise ConfigError(
            f"{what} is registered but its module {module} is not part of this clipsam installation: "
            "update clipsam, or choose another one"
        ) from None


def import_attr(module: str, attr: str, *, what: str) -> Any:
    """``module.attr``; a missing module or attribute is a :class:`ConfigError` naming ``what``."""
    mod = _module(module, what=what)
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigError(f"{what}: {module} defines no {attr!r} (a broken module)") from None


def optional_attr(module: str, attr: str, *, what: str) -> Any:
    """``module.attr`` or None when the module does not define it (an optional hook)."""
    return getattr(_module(module, what=what), attr, None)

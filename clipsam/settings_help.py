"""``--help`` listings of every method's and refiner's settings, with their defaults.

Built only when help is printed (it imports every method module to read its dataclass).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from clipsam.settings import to_plain

__all__ = ["settings_listing"]


def _flat(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        out: list[str] = []
        for key, item in value.items():
            out += _flat(item, f"{prefix}{key}.")
        return out
    return [f"{prefix[:-1]}={value!r}"]


def _describe(cls: type) -> str:
    try:
        return ", ".join(_flat(to_plain(cls())))
    except Exception as err:  # a dataclass without defaults: list the names
        return ", ".join(f.name for f in dataclasses.fields(cls)) + f" ({type(err).__name__})"


def settings_listing(kind: str) -> str:
    """One line per method (``kind="method"``) or refiner: its settings keys and defaults."""
    from clipsam import methods, refiners
    from clipsam.registry import import_attr

    lines = []
    if kind == "method":
        for name, spec in methods.METHODS.items():
            try:
                cls = import_attr(spec.module, spec.config, what=name)
                lines.append(f"  {name}: {_describe(cls)}")
            except Exception as err:  # a method whose optional dependency is missing
                lines.append(f"  {name}: (not importable: {err})")
    else:
        for name in refiners.REFINERS:
            try:
                cls = refiners.refiner_config_class(name)
            except Exception as err:
                lines.append(f"  {name}: (not importable: {err})")
                continue
            lines.append(f"  {name}: {_describe(cls) if cls is not None else '(no settings)'}")
    return f"Settings per {kind} (key=default):\n" + "\n".join(lines)

"""Settings dataclasses from config mappings, with errors that name the key as the user wrote it.

Every method and refiner keeps its knobs in one dataclass (nested dataclasses for sections such
as a refiner's ``sam``); :func:`from_mapping` builds it from a YAML/CLI mapping, and
:func:`to_plain` turns it back into plain dicts and lists (what hparams and bundles store).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from clipsam.errors import ConfigError

__all__ = ["from_mapping", "to_plain"]


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: no nested conversion
        return {}


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass an annotation names (``X``, ``X | None``, ``Optional[X]``), else None."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def from_mapping(cls: type, value: Any, *, key: str) -> Any:
    """Build dataclass ``cls`` from ``value`` (None: defaults; an instance: kept; a mapping).

    Nested dataclass fields accept mappings too. Unknown keys are refused with their full path.

    Args:
        cls: the settings dataclass.
        value: None, an instance of ``cls`` or a mapping of its field names.
        key: where ``value`` sits in the config (``model.method_config``), used in errors.

    Raises:
        ConfigError: unknown keys (named as ``<key>.<name>``, valid keys listed), a value of the
            wrong kind, or a value the dataclass refuses.
    """
    if value is None:
        try:
            return cls()
        except ConfigError:
            raise
        except TypeError as err:
            raise ConfigError(f"{key}: {err}") from None
    if isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = to_plain(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping of {cls.__name__} keys, got {type(value).__name__} {value!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in value if k not in names]
    if unknown:
        listed = ", ".join(f"{key}.{k}" for k in unknown)
        raise ConfigError(f"{listed}: not a setting of {cls.__name__}; valid keys under {key}: {', '.join(names)}")
    types = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for name, item in value.items():
        nested = _dataclass_in(types.get(name))
        if nested is not None and (isinstance(item, Mapping) or item is None) and not (item is None and _optional(types.get(name))):
            item = from_mapping(nested, item, key=f"{key}.{name}")
        kwargs[name] = item
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None


def _optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: what loads with ``torch.load(weights_only=True)``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value

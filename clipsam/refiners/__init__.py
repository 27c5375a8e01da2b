"""The registry of refiners (``model.refiner``): a name in the config -> the module that builds it.

Importing this package imports no refiner (and no segment_anything); a refiner's module is
imported only when its settings are read or it is built. Adding a refiner is one file under
``clipsam/refiners/`` plus one line in :data:`REFINERS`; the file defines:

- ``CONFIG``: its settings dataclass (``model.refiner_config``), every knob with a default;
- ``build(config, *, use_embedding_cache: bool) -> Refiner``;
- optionally ``input_specs(config) -> list[InputSpec]``: the model inputs it reads from the
  batch (:mod:`clipsam.inputs`; e.g. SAM's input of the original image).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from clipsam.errors import ConfigError
from clipsam.registry import import_attr, optional_attr
from clipsam.settings import from_mapping

__all__ = [
    "DEFAULT_REFINER",
    "REFINERS",
    "RefinerSpec",
    "build_refiner",
    "get_refiner",
    "refiner_config",
    "refiner_inputs",
    "refiner_names",
]


@dataclasses.dataclass(frozen=True)
class RefinerSpec:
    """Where a refiner lives (``module`` empty: no refiner, the producer's map is the score).

    Attributes:
        module: import path of the refiner's module.
        summary: one line for listings and error messages.
        uses_sam: whether it runs a SAM (so ``model.sam``, the deprecated section, applies to it).
    """

    module: str = ""
    summary: str = ""
    uses_sam: bool = False


DEFAULT_REFINER = "ppg_cps"

REFINERS: dict[str, RefinerSpec] = {
    "ppg_cps": RefinerSpec("clipsam.refiners.ppg_cps", "frozen SAM with PPG point prompts and CPS cascade", uses_sam=True),
    "mmr": RefinerSpec("clipsam.refiners.mmr", "ClipSAM-rec's multi-level mask refinement with SAM", uses_sam=True),
    "none": RefinerSpec(summary="no refinement: the producer's map is the pixel score"),
}


def refiner_names() -> list[str]:
    """Registered refiner names, in registry order."""
    return list(REFINERS)


def get_refiner(name: str) -> RefinerSpec:
    """The spec of refiner ``name``; an unknown name is a :class:`ConfigError` listing the choices."""
    try:
        return REFINERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"model.refiner={name!r} is not a refiner: choose one of {', '.join(REFINERS)}") from None


def refiner_config_class(name: str) -> type | None:
    """The settings dataclass of refiner ``name`` (None for ``none``)."""
    spec = get_refiner(name)
    if not spec.module:
        return None
    return import_attr(spec.module, "CONFIG", what=f"model.refiner={name!r}")


def refiner_config(name: str, value: Any = None, *, key: str = "model.refiner_config") -> Any:
    """The settings of refiner ``name`` from ``value`` (None, a mapping or an instance), validated.

    Raises:
        ConfigError: unknown keys, named ``model.refiner_config.<key>``; settings for ``none``.
    """
    cls = refiner_config_class(name)
    if cls is None:
        if value:
            raise ConfigError(f"{key} is set but model.refiner=none has no settings: remove {key}")
        return None
    return from_mapping(cls, value, key=key)


def refiner_inputs(name: str, config: Any) -> list[Any]:
    """The inputs (:class:`clipsam.inputs.InputSpec`) refiner ``name`` reads from the batch."""
    spec = get_refiner(name)
    if not spec.module:
        return []
    inputs = optional_attr(spec.module, "input_specs", what=f"model.refiner={name!r}")
    return list(inputs(config)) if inputs is not None else []


def refiner_choices(name: str, config: Any) -> dict[str, Any]:
    """The settings refiner ``name`` records in every run report (``run.choices``, shown by
    ``clipsam compare``): its module's optional ``open_choices(config)`` hook, for the choices a
    paper leaves open and clipsam takes; {} without one."""
    spec = get_refiner(name)
    if not spec.module:
        return {}
    hook = optional_attr(spec.module, "open_choices", what=f"model.refiner={name!r}")
    return dict(hook(config)) if hook is not None else {}


def build_refiner(name: str, config: Any = None, *, use_embedding_cache: bool = True) -> Any:
    """Build refiner ``name`` from its settings; None for ``"none"``.

    Returns:
        a :class:`clipsam.refiners.base.Refiner`, or None.
    """
    spec = get_refiner(name)
    if not spec.module:
        return None
    builder = import_attr(spec.module, "build", what=f"model.refiner={name!r}")
    refiner = builder(refiner_config(name, config), use_embedding_cache=use_embedding_cache)
    from clipsam.refiners.base import Refiner

    if not isinstance(refiner, Refiner):
        raise TypeError(f"the builder of refiner {name!r} returned {type(refiner).__name__}, not a Refiner")
    return refiner

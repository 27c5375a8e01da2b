"""The registry of methods (map producers) and refiners: a name in the config -> code to build it.

Both tables are plain dicts of import paths, so importing :mod:`clipsam.methods` imports no
method (and no open_clip / segment_anything); a method's module is imported only when that method
is built. Adding a method is one file under ``clipsam/methods/`` plus one line in
:data:`METHODS`; it touches no other method.

Each method module defines (the convention every method follows):

- a config dataclass, exposed as the module attribute named by :attr:`MethodSpec.config`
  (``CONFIG`` by default): every knob of the method, with documented defaults;
- a builder ``build(config, *, image_size: int) -> MapProducer`` (attribute named by
  :attr:`MethodSpec.builder`).

``model.method`` picks the method; its settings come from ``model.method_config`` (a mapping
validated against the method's dataclass), except for ``april_gan`` whose section stays
``model.clip`` (see docs/design.md).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from clipsam.errors import ConfigError

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_REFINER",
    "METHODS",
    "REFINERS",
    "MethodSpec",
    "RefinerSpec",
    "build_producer",
    "build_refiner",
    "get_method",
    "get_refiner",
    "method_config",
    "method_names",
    "refiner_names",
]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Where a method lives.

    Attributes:
        module: import path of the method's module.
        builder: name of its ``build(config, *, image_size) -> MapProducer`` function.
        config: name of its config dataclass attribute.
        trainable: whether the method trains (``clipsam fit``); must equal its producer class's
            :attr:`~clipsam.methods.base.MapProducer.trainable` (checked when it is built). Known
            here so ``fit`` is refused before anything is built or written.
        summary: one line for ``--help`` style listings and error messages.
    """

    module: str
    builder: str = "build"
    config: str = "CONFIG"
    trainable: bool = False
    summary: str = ""


@dataclasses.dataclass(frozen=True)
class RefinerSpec:
    """Where a refiner lives: ``module:builder`` builds it from the module's config sections.

    ``module`` empty means "no refiner" (the producer's map is the final score).
    """

    module: str = ""
    builder: str = "build"
    summary: str = ""


DEFAULT_METHOD = "april_gan"
DEFAULT_REFINER = "ppg_cps"

METHODS: dict[str, MethodSpec] = {
    "april_gan": MethodSpec("clipsam.methods.april_gan", trainable=True, summary="APRIL-GAN linear adapters on CLIP (trained)"),
    "winclip": MethodSpec("clipsam.methods.winclip", summary="WinCLIP window scores (training-free)"),
    "anomalyclip": MethodSpec("clipsam.methods.anomalyclip", trainable=True, summary="AnomalyCLIP object-agnostic prompts (trained)"),
    "sdp": MethodSpec("clipsam.methods.sdp", summary="CLIP surgery / SDP (training-free)"),
    "sdp_plus": MethodSpec(
        "clipsam.methods.sdp", builder="build_plus", config="CONFIG_PLUS", trainable=True, summary="SDP+ (linear layers, trained)"
    ),
    "umci": MethodSpec("clipsam.methods.umci", trainable=True, summary="ClipSAM-rec's UMCI on CLIP (trained)"),
    "saa": MethodSpec(
        "clipsam.baselines.saa", builder="build_vanilla", config="CONFIG_VANILLA", summary="SAA vanilla (training-free)"
    ),
    "saa_plus": MethodSpec("clipsam.baselines.saa", summary="SAA+ (Grounding DINO + SAM + saliency, training-free)"),
}

REFINERS: dict[str, RefinerSpec] = {
    "ppg_cps": RefinerSpec(
        "clipsam.methods.refiners", builder="build_ppg_cps", summary="frozen SAM with PPG point prompts and CPS cascade"
    ),
    "mmr": RefinerSpec("clipsam.methods.mmr", builder="build_mmr", summary="ClipSAM-rec's multi-level mask refinement with SAM"),
    "none": RefinerSpec(summary="no refinement: the producer's map is the pixel score"),
}


def method_names() -> list[str]:
    """Registered method names, in registry order."""
    return list(METHODS)


def refiner_names() -> list[str]:
    """Registered refiner names, in registry order."""
    return list(REFINERS)


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; an unknown name is a :class:`ConfigError` listing the choices."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"model.method={name!r} is not a method: choose one of {', '.join(METHODS)}") from None


def get_refiner(name: str) -> RefinerSpec:
    """The spec of refiner ``name``; an unknown name is a :class:`ConfigError` listing the choices."""
    try:
        return REFINERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"model.refiner={name!r} is not a refiner: choose one of {', '.join(REFINERS)}") from None


def _import_attr(module: str, attr: str, *, what: str) -> Any:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:  # the module exists but one of its own imports is missing
            raise
        raise ConfigError(
            f"{what} is registered but its module {module} is not part of this clipsam installation: "
            "update clipsam, or choose another one"
        ) from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigError(f"{what}: {module} defines no {attr!r} (a broken method module)") from None


def _method_parts(name: str) -> tuple[type, Callable[..., Any]]:
    spec = get_method(name)
    config_cls = _import_attr(spec.module, spec.config, what=f"model.method={name!r}")
    builder = _import_attr(spec.module, spec.builder, what=f"model.method={name!r}")
    return config_cls, builder


def method_config(name: str, value: Any = None, *, key: str = "model.method_config") -> Any:
    """The config dataclass of method ``name`` from ``value`` (None, a mapping, or an instance).

    Raises:
        ConfigError: unknown method, or keys the method's dataclass does not have (named, with
            the valid keys listed), or a value of the wrong kind.
    """
    config_cls, _ = _method_parts(name)
    if value is None:
        return config_cls()
    if isinstance(value, config_cls):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        raise ConfigError(f"{key} is a {type(value).__name__} but model.method={name!r} needs a {config_cls.__name__}")
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping of {config_cls.__name__} keys, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(
            f"{key} has keys {unknown} that method {name!r} ({config_cls.__name__}) does not know; "
            f"valid keys: {sorted(names)}"
        )
    try:
        return config_cls(**dict(value))
    except TypeError as err:
        raise ConfigError(f"{key} for method {name!r}: {err}") from None


def build_producer(name: str, config: Any, *, image_size: int, **kwargs: Any) -> Any:
    """Build the :class:`~clipsam.methods.base.MapProducer` of method ``name``.

    Args:
        name: a key of :data:`METHODS`.
        config: the method's config dataclass (see :func:`method_config`).
        image_size: the evaluation frame side H = W.
        **kwargs: extra keyword arguments of that method's builder.
    """
    config = method_config(name, config)
    _, builder = _method_parts(name)
    producer = builder(config, image_size=int(image_size), **kwargs)
    from clipsam.methods.base import MapProducer

    if not isinstance(producer, MapProducer):
        raise TypeError(f"the builder of method {name!r} returned {type(producer).__name__}, not a MapProducer")
    return producer


def build_refiner(name: str, *, refiner_config: Mapping[str, Any] | None = None, **sections: Any) -> Any:
    """Build refiner ``name`` from the module's config sections (``sam``, ``prompt``, ``cascade``).

    The builder gets every section as a keyword (taking what it needs) and ``refiner_config``
    (``model.refiner_config``) under the refiner's own name, e.g. ``build_mmr(sam=..., mmr=...)``.

    Returns:
        a :class:`~clipsam.methods.base.Refiner`, or None for ``"none"``.
    """
    spec = get_refiner(name)
    if not spec.module:
        return None
    builder = _import_attr(spec.module, spec.builder, what=f"model.refiner={name!r}")
    return builder(**sections, **{name: refiner_config})

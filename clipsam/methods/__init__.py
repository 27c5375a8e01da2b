"""The registry of methods (map producers): a name in the config -> the module that builds it.

The table is a plain dict of import paths, so importing :mod:`clipsam.methods` imports no method
(and no open_clip / segment_anything); a method's module is imported only when its settings are
read or it is built. Adding a method is one file under ``clipsam/methods/`` plus one line in
:data:`METHODS`; it touches no other method. The file defines:

- a settings dataclass (module attribute :attr:`MethodSpec.config`, ``CONFIG`` by default):
  every knob of the method, with its reference's value as the default (``model.method_config``);
- a builder ``build(config, *, image_size: int) -> MapProducer`` (:attr:`MethodSpec.builder`);
- optionally ``input_specs(config, *, image_size) -> list[InputSpec]``: the inputs it reads,
  built from the original image (:mod:`clipsam.inputs`); the first is what its ``forward``
  receives. Without it the producer reads the evaluation frame (batch key ``image``);
- optionally ``checkpoint_meta(config) -> dict`` and ``check_checkpoint(meta, config, where)``:
  what a checkpoint records about the frozen parts its trained weights depend on, and the check
  that refuses a checkpoint trained on other frozen parts;
- optionally ``reference_count(config) -> int``: how many good reference images per category
  the method needs (few-shot; 0 or no hook: none). Its producer then implements
  :meth:`~clipsam.methods.base.MapProducer.set_references`; the pipeline feeds it
  (:meth:`clipsam.pipeline.Pipeline.set_references`).

Refiners have their own registry, :mod:`clipsam.refiners`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from clipsam.errors import ConfigError
from clipsam.registry import import_attr, optional_attr
from clipsam.settings import from_mapping

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "MethodSpec",
    "build_producer",
    "get_method",
    "input_key",
    "method_config",
    "method_hook",
    "method_inputs",
    "method_names",
    "method_reference_count",
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


DEFAULT_METHOD = "april_gan"

METHODS: dict[str, MethodSpec] = {
    "april_gan": MethodSpec("clipsam.methods.april_gan", trainable=True, summary="APRIL-GAN linear adapters on CLIP (trained)"),
    "winclip": MethodSpec("clipsam.methods.winclip", summary="WinCLIP window scores (training-free)"),
    "anomalyclip": MethodSpec("clipsam.methods.anomalyclip", trainable=True, summary="AnomalyCLIP object-agnostic prompts (trained)"),
    "sdp": MethodSpec("clipsam.methods.sdp", summary="CLIP surgery / SDP (training-free)"),
    "sdp_plus": MethodSpec(
        "clipsam.methods.sdp", builder="build_plus", config="CONFIG_PLUS", trainable=True, summary="SDP+ (linear layers, trained)"
    ),
    "umci": MethodSpec("clipsam.methods.umci", trainable=True, summary="ClipSAM-rec's UMCI on CLIP (trained)"),
    "saa": MethodSpec("clipsam.methods.saa", builder="build_vanilla", config="CONFIG_VANILLA", summary="SAA vanilla (training-free)"),
    "saa_plus": MethodSpec("clipsam.methods.saa", summary="SAA+ (Grounding DINO + SAM + saliency, training-free)"),
    "musc": MethodSpec("clipsam.methods.musc", summary="MuSc mutual scoring over a category's test images (training-free, transductive)"),
    "adaclip": MethodSpec("clipsam.methods.adaclip", trainable=True, summary="AdaCLIP hybrid static + dynamic prompts with HSF (trained)"),
}


def method_names() -> list[str]:
    """Registered method names, in registry order."""
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; an unknown name is a :class:`ConfigError` listing the choices."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"model.method={name!r} is not a method: choose one of {', '.join(METHODS)}") from None


def _method_parts(name: str) -> tuple[type, Callable[..., Any]]:
    spec = get_method(name)
    config_cls = import_attr(spec.module, spec.config, what=f"model.method={name!r}")
    builder = import_attr(spec.module, spec.builder, what=f"model.method={name!r}")
    return config_cls, builder


def method_config(name: str, value: Any = None, *, key: str = "model.method_config") -> Any:
    """The settings dataclass of method ``name`` from ``value`` (None, a mapping, or an instance).

    Raises:
        ConfigError: unknown method, or keys the method's dataclass does not have (each named as
            ``model.method_config.<key>``, the valid keys listed), or a value it refuses.
    """
    config_cls, _ = _method_parts(name)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and not isinstance(value, config_cls):
        raise ConfigError(f"{key} is a {type(value).__name__} but model.method={name!r} needs a {config_cls.__name__}")
    return from_mapping(config_cls, value, key=key)


def method_hook(name: str, hook: str) -> Callable[..., Any] | None:
    """An optional module-level function of method ``name`` (``input_specs``, ``checkpoint_meta``,
    ``check_checkpoint``, ``reference_count``, ``inference_batching``, ``category_block``), or None when the method
    does not define it."""
    return optional_attr(get_method(name).module, hook, what=f"model.method={name!r}")


def method_inputs(name: str, config: Any, *, image_size: int) -> list[Any]:
    """The inputs (:class:`clipsam.inputs.InputSpec`) method ``name`` reads besides the frame."""
    hook = method_hook(name, "input_specs")
    return list(hook(config, image_size=int(image_size))) if hook is not None else []


def method_reference_count(name: str, config: Any) -> int:
    """How many good reference images per category method ``name`` needs (0: none)."""
    hook = method_hook(name, "reference_count")
    count = int(hook(config)) if hook is not None else 0
    if count < 0:
        raise ConfigError(f"model.method={name!r}: reference_count must be >= 0, got {count}")
    return count


BATCHING_MODES = ("image", "category")


def method_batching(name: str, config: Any, *, image_size: int) -> str:
    """How validate/test/predict batch method ``name``'s images (its ``inference_batching`` hook):
    ``"image"`` (any batches; default) or ``"category"`` (one batch per category holding all its
    images: a transductive method such as MuSc scores each image against the others)."""
    hook = method_hook(name, "inference_batching")
    mode = str(hook(config, image_size=int(image_size))) if hook is not None else "image"
    if mode not in BATCHING_MODES:
        raise ConfigError(f"model.method={name!r}: inference_batching must be one of {list(BATCHING_MODES)}, got {mode!r}")
    return mode


def input_key(name: str, config: Any, *, image_size: int) -> str:
    """The batch key the producer of ``name`` reads its images from (``image``: the frame)."""
    specs = method_inputs(name, config, image_size=image_size)
    return specs[0].key if specs else "image"


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
    producer.input_key = input_key(name, config, image_size=image_size)
    producer.frame_size = int(image_size)
    return producer

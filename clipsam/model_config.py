"""The ``model`` section resolved: which method and refiner, with their validated settings.

One shape for every method and refiner: ``model.method`` + ``model.method_config`` and
``model.refiner`` + ``model.refiner_config``, each validated in full against the part's own
settings dataclass, errors naming the key as it was written.

The alias table (:func:`resolve_model_settings`) keeps configs, hparams and checkpoints of earlier
versions working: ``model.clip`` (+ ``model.focal_gamma``) were APRIL-GAN's settings;
``model.sam``, ``model.prompt`` and ``model.cascade`` were the SAM refiners' sections;
``model.evaluation.use_sam`` chose between ``ppg_cps`` and ``none``. Each prints a one-line
deprecation note.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

from clipsam import methods, refiners
from clipsam.errors import ConfigError
from clipsam.settings import to_plain

__all__ = ["ModelSettings", "OptimizerConfig", "check_precision", "deprecation_note", "resolve_model_settings"]

#: the method whose settings the deprecated ``model.clip`` / ``model.focal_gamma`` held.
LEGACY_CLIP_METHOD = "april_gan"

_NOTED: set[str] = set()


def deprecation_note(message: str) -> None:
    """Print a one-line deprecation note on stderr, once per process."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"clipsam: note: {message}", file=sys.stderr)


@dataclasses.dataclass
class OptimizerConfig:
    """Adam for the trainable parameters (the paper: Adam, lr 1e-3, batch 16).

    Attributes:
        lr: learning rate.
        betas: Adam's (beta1, beta2). The paper names none; the default (0.5, 0.999) is
            APRIL-GAN's training script, the protocol the paper builds on.
        weight_decay: L2 penalty (0 in the paper); with ``name: adamw`` the decoupled decay.
        name: ``adam`` (``torch.optim.Adam``, weight decay as an L2 penalty) or ``adamw``
            (``torch.optim.AdamW``, decoupled weight decay: AdaCLIP's trainer).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    name: str = "adam"

    def __post_init__(self) -> None:
        if self.name not in ("adam", "adamw"):
            raise ConfigError(f"model.optimizer.name={self.name!r}: use 'adam' or 'adamw'.")

    def build(self, params: Any) -> Any:
        """The optimizer over ``params``: ``torch.optim.Adam`` or ``AdamW`` with these settings."""
        import torch

        optimizer_cls = torch.optim.AdamW if self.name == "adamw" else torch.optim.Adam
        return optimizer_cls(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)


@dataclasses.dataclass
class ModelSettings:
    """The resolved method and refiner.

    Attributes:
        method: a name of :data:`clipsam.methods.METHODS`.
        method_config: its settings dataclass.
        method_key: where its settings were written (``model.method_config``, or ``model.clip``).
        refiner: a name of :data:`clipsam.refiners.REFINERS`.
        refiner_config: its settings dataclass (None for ``none``).
        refiner_key: where its settings were written.
    """

    method: str
    method_config: Any
    method_key: str
    refiner: str
    refiner_config: Any
    refiner_key: str


def check_precision(precision: str) -> None:
    """Refuse a Trainer precision that would cast the trainable parameters too."""
    if precision in ("bf16-true", "16-true", "64-true", "transformer-engine", "transformer-engine-float16"):
        raise ConfigError(
            f"trainer.precision={precision} would cast the trainable parameters too: use "
            "trainer.precision=32-true and choose the dtype of the frozen models with "
            "model.method_config.frozen_dtype and model.refiner_config.sam.dtype (bfloat16 is the fast path)"
        )


def _plain(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(f"expected a mapping of settings, got {type(value).__name__} {value!r}")


def _resolve_refiner_name(refiner: str | None, use_sam: bool) -> str:
    """``model.refiner``, or the deprecated ``model.evaluation.use_sam`` when it is unset."""
    if refiner is None:
        return refiners.DEFAULT_REFINER if use_sam else "none"
    refiners.get_refiner(refiner)
    if refiner != "none" and not use_sam:
        raise ConfigError(
            f"model.refiner={refiner} but model.evaluation.use_sam=false (its deprecated alias) "
            "turns the refiner off: drop model.evaluation.use_sam, or set model.refiner=none"
        )
    return refiner


def resolve_model_settings(
    *,
    method: str,
    method_config: Any,
    refiner: str | None,
    refiner_config: Any,
    use_sam: bool = True,
    clip: Any = None,
    sam: Any = None,
    prompt: Any = None,
    cascade: Any = None,
    focal_gamma: float | None = None,
) -> ModelSettings:
    """Validate the method and refiner settings, applying the deprecated aliases.

    Raises:
        ConfigError: an unknown method/refiner, an unknown or invalid key (named as written), or
            a setting given twice (in its section and in its deprecated alias).
    """
    name = str(method)
    method_values = _plain(method_config)
    method_key = "model.method_config"
    if clip is not None:
        if name == LEGACY_CLIP_METHOD:
            if method_values:
                raise ConfigError(
                    "model.clip and model.method_config are both set: model.clip is the deprecated name of "
                    f"model.method_config for model.method={name}; keep one"
                )
            method_values, method_key = _plain(clip), "model.clip"
            deprecation_note("model.clip is deprecated: write its keys under model.method_config")
        else:
            deprecation_note(f"model.clip is ignored: model.method={name} takes its settings from model.method_config")
    if focal_gamma is not None:
        if name == LEGACY_CLIP_METHOD:
            method_values = dict(method_values or {})
            method_values.setdefault("focal_gamma", float(focal_gamma))
            deprecation_note("model.focal_gamma is deprecated: write it as model.method_config.focal_gamma")
        else:
            deprecation_note(f"model.focal_gamma is ignored: model.method={name} has its own settings in model.method_config")
    config = methods.method_config(name, method_values, key=method_key)

    refiner_name = _resolve_refiner_name(refiner, use_sam)
    refiner_values = _plain(refiner_config)
    refiner_key = "model.refiner_config"
    legacy = {k: v for k, v in (("sam", sam), ("prompt", prompt), ("cascade", cascade)) if v is not None}
    if legacy:
        cls = refiners.refiner_config_class(refiner_name)
        fields = {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
        used = {k: v for k, v in legacy.items() if k in fields}
        ignored = sorted(set(legacy) - set(used))
        if used:
            refiner_values = dict(refiner_values or {})
            both = sorted(k for k in used if k in refiner_values)
            if both:
                raise ConfigError(
                    f"model.{both[0]} and model.refiner_config.{both[0]} are both set: model.{both[0]} is the "
                    f"deprecated name of model.refiner_config.{both[0]}; keep one"
                )
            refiner_values.update({k: _plain(v) for k, v in used.items()})
            deprecation_note(
                f"model.{', model.'.join(sorted(used))} deprecated: write "
                + ", ".join(f"model.refiner_config.{k}" for k in sorted(used))
            )
        if ignored:
            deprecation_note(f"model.{', model.'.join(ignored)} ignored: model.refiner={refiner_name} has no such settings")
    if refiner_name == "none":
        refiner_values = None  # 'none' has no settings; a stacked base config's refiner settings are unused
    settings = refiners.refiner_config(refiner_name, refiner_values, key=refiner_key)
    return ModelSettings(name, config, method_key, refiner_name, settings, refiner_key)

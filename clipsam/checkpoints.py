"""What a clipsam checkpoint holds, and the checks before one loads.

A checkpoint keeps only the producer's trainable state (``producer.*`` keys; frozen parts are
rebuilt from the config: a few MB for ViT-L, not 1.7 GB), the method's name, the trained shapes,
the optimiser settings used, and what the method says its trained weights depend on (its
``checkpoint_meta`` hook, e.g. APRIL-GAN's frozen CLIP). A checkpoint never loads into another
method, nor into other frozen weights (the method's ``check_checkpoint`` hook).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from clipsam import methods
from clipsam.errors import WeightsError
from clipsam.settings import to_plain

__all__ = [
    "PRODUCER_PREFIX",
    "apply_optimizer_config",
    "check_checkpoint",
    "producer_state",
    "strip_checkpoint",
    "to_module_keys",
    "upgrade_legacy",
]

PRODUCER_PREFIX = "producer."
PIPELINE_PREFIX = "pipeline."
# Checkpoints written before model.method existed kept APRIL-GAN's adapters under
# ``clip_model.adapters.*``; they are the producer's ``model.adapters.*``.
LEGACY_ADAPTER_PREFIX = "clip_model.adapters."
LEGACY_METHOD = "april_gan"  # the only method before model.method existed
_LEGACY_TARGET = PRODUCER_PREFIX + "model.adapters."


def strip_checkpoint(checkpoint: dict[str, Any], pipeline: Any, optimizer: Any) -> None:
    """Keep only the producer's trainable state and record what it depends on (in place)."""
    producer = pipeline.build_producer()
    keep = set(producer.trainable_state_dict())
    state = checkpoint["state_dict"]
    # The module holds the producer as ``pipeline.producer``; checkpoints name it ``producer.*``.
    owned = {k[len(PIPELINE_PREFIX) :]: v for k, v in state.items() if k.startswith(PIPELINE_PREFIX)}
    checkpoint["state_dict"] = {k: v for k, v in owned.items() if k.startswith(PRODUCER_PREFIX) and k[len(PRODUCER_PREFIX) :] in keep}
    meta: dict[str, Any] = {
        "method": pipeline.method,
        "trainable_shapes": {k: list(v.shape) for k, v in checkpoint["state_dict"].items()},
        "optimizer": to_plain(optimizer),
    }
    hook = methods.method_hook(pipeline.method, "checkpoint_meta")
    if hook is not None:
        meta.update(hook(pipeline.method_config))
    checkpoint["clipsam"] = meta


def upgrade_legacy(checkpoint: dict[str, Any]) -> None:
    """Rename the adapters of checkpoints written before model.method existed, in place."""
    state = checkpoint.get("state_dict", {}) or {}
    if "method" in (checkpoint.get("clipsam", {}) or {}):
        return
    for key in [k for k in state if k.startswith(LEGACY_ADAPTER_PREFIX)]:
        state[_LEGACY_TARGET + key[len(LEGACY_ADAPTER_PREFIX) :]] = state.pop(key)


def to_module_keys(checkpoint: dict[str, Any]) -> None:
    """Rename ``producer.*`` to the module's ``pipeline.producer.*`` keys, in place."""
    state = checkpoint.get("state_dict", {}) or {}
    for key in [k for k in state if k.startswith(PRODUCER_PREFIX)]:
        state[PIPELINE_PREFIX + key] = state.pop(key)


def producer_state(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The producer's trained tensors, keys without the ``producer.`` prefix."""
    state = checkpoint.get("state_dict", {}) or {}
    return {k[len(PRODUCER_PREFIX) :]: v for k, v in state.items() if k.startswith(PRODUCER_PREFIX)}


def check_checkpoint(checkpoint: Mapping[str, Any], pipeline: Any, *, path: Any = None, method_key: str = "model.method_config") -> None:
    """Refuse a checkpoint of another method, or trained weights that do not fit this config.

    The method must be the configured one (checkpoints without a recorded method are
    APRIL-GAN's); then the method's ``check_checkpoint`` hook compares what its weights depend
    on. The CLI calls this before any run folder exists; the module again when loading.

    Raises:
        WeightsError: naming the recorded and the configured value and the key to change.
    """
    where = f"checkpoint {path}" if path is not None else "the checkpoint"
    meta = checkpoint.get("clipsam", {}) or {}
    trained_method = meta.get("method", LEGACY_METHOD)
    if trained_method != pipeline.method:
        raise WeightsError(
            f"{where} was trained with model.method={trained_method} but this config runs "
            f"model.method={pipeline.method}: use a checkpoint of {pipeline.method}, or set "
            f"model.method={trained_method} (and its settings)"
        )
    hook = methods.method_hook(pipeline.method, "check_checkpoint")
    if hook is not None:
        state = dict(checkpoint.get("state_dict", {}) or {})
        legacy = {_LEGACY_TARGET + k[len(LEGACY_ADAPTER_PREFIX) :]: v for k, v in state.items() if k.startswith(LEGACY_ADAPTER_PREFIX)}
        hook(meta, producer_state({"state_dict": {**state, **legacy}}), pipeline.method_config, where=where, key=method_key)


def apply_optimizer_config(checkpoint: dict[str, Any], optimizer: Any) -> None:
    """Resume: the configured lr/betas/weight decay replace those in the saved optimiser state."""
    wanted = {
        "lr": float(optimizer.lr),
        "betas": tuple(float(b) for b in optimizer.betas),
        "weight_decay": float(optimizer.weight_decay),
    }
    changed: dict[str, tuple[Any, Any]] = {}
    for optimizer_state in checkpoint.get("optimizer_states", []) or []:
        for group in optimizer_state.get("param_groups", []):
            for key, value in wanted.items():
                if key not in group:
                    continue
                old = tuple(group[key]) if isinstance(group[key], (list, tuple)) else group[key]
                if old != value:
                    changed[key] = (old, value)
                group[key] = value
            if "initial_lr" in group:
                group["initial_lr"] = wanted["lr"]
    if changed:
        said = ", ".join(f"model.optimizer.{k}={new} (the checkpoint had {old})" for k, (old, new) in changed.items())
        print(f"clipsam: resuming with {said}", file=sys.stderr)

"""Swap ``forward`` on the instances of one module class inside ONE model, and swap it back.

The swap is an instance attribute (``module.forward = MethodType(fn, module)``): other models and
the class itself are untouched, and weights and state-dict keys stay the library's. Used by
:mod:`clipsam.models.sam_attention` and :mod:`clipsam.models.clip_attention`.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn

__all__ = ["install_forward", "uninstall_forward"]


def install_forward(model: nn.Module, module_type: type[nn.Module], forward: Callable) -> int:
    """Give every ``module_type`` instance in ``model`` ``forward`` as its own forward.

    Returns:
        The number of modules changed.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, module_type):
            module.forward = types.MethodType(forward, module)
            count += 1
    return count


def uninstall_forward(model: nn.Module, module_type: type[nn.Module]) -> int:
    """Undo :func:`install_forward`: the class's own ``forward`` again. Returns how many changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, module_type) and "forward" in vars(module):
            del module.forward
            count += 1
    return count

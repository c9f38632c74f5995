"""Finding target modules in a model and replacing them with adapted layers (PEFT's matching rule)."""

from __future__ import annotations

import re
from typing import Callable

from torch import nn


def matches_target(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must fullmatch the module name; a list entry must equal it or be a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the nn.Linear modules of ``model`` that ``targets`` selects; a clear error if none."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = [n for n in linear_names if matches_target(n, targets)]
    if isinstance(targets, list):
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_names)]
        if missing:
            available = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise ValueError(f"target_modules {missing} match no linear module of {type(model).__name__}; "
                             f"linear modules it has: {available}")
    if not found:
        available = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(f"target_modules {targets!r} match no linear module of {type(model).__name__}; "
                         f"linear modules it has: {available}")
    return found


def inject_linear_layers(model: nn.Module, targets: list[str] | str,
                         make_layer: Callable[[nn.Linear], nn.Module]) -> dict[str, nn.Module]:
    """Freeze every parameter of ``model``, then replace each target ``nn.Linear`` by ``make_layer(linear)``.

    Returns ``{module name: new layer}``; a target that matches nothing is a ValueError listing the
    linear modules the model has (``find_target_modules``).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in find_target_modules(model, targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layers[name] = make_layer(getattr(parent, child))
        setattr(parent, child, layers[name])
    return layers

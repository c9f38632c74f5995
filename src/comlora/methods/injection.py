"""Finding target modules in a model and replacing them with adapted layers (PEFT's matching rule),
and the default target modules of each architecture."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from torch import nn

from comlora.methods.lora_layer import ADAPTABLE_LAYERS
from comlora.peft_import import peft

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]   # the paper's choice, Llama names

# The paper's choice (q, k, v, up, down) in each naming where it fits, tried in order: Llama-style
# names (Llama, Mistral, Qwen2/3, Gemma 1-3, Cohere ...), then Phi-3's fused projections, adapted as
# whole modules as PEFT does (qkv_proj holds q, k, v; gate_up_proj holds gate and up).
PAPER_TARGET_MODULES = (list(DEFAULT_TARGET_MODULES), ["qkv_proj", "gate_up_proj", "down_proj"])


def matches_target(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must fullmatch the module name; a list entry must equal it or be a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Full names of the layers an adapter can wrap: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 family)."""
    return [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE_LAYERS)]


def linear_module_summary(model: nn.Module) -> list[str]:
    """The distinct last name parts of the model's adaptable layers (what an error message lists)."""
    return sorted({n.rsplit(".", 1)[-1] for n in adaptable_module_names(model)})


def default_target_modules(model: nn.Module,
                           preferred: Sequence[list[str]] = PAPER_TARGET_MODULES,
                           use_peft_mapping: bool = True) -> list[str] | str:
    """The targets ``target_modules=None`` stands for on ``model``.

    The first list of ``preferred`` whose every name is a layer of the model; else (``use_peft_mapping``)
    PEFT's default LoRA targets for ``model.config.model_type``
    (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, read at run time); else a ValueError
    listing the model's linear layers.
    """
    names = adaptable_module_names(model)
    for candidate in preferred:
        if all(any(matches_target(n, [t]) for n in names) for t in candidate):
            return list(candidate)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    peft_defaults = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    mapped = peft_defaults.get(model_type) if use_peft_mapping else None
    if mapped is not None:
        return mapped if isinstance(mapped, str) else list(mapped)
    tried = " or ".join(str(c) for c in preferred)
    peft_part = (f"nor does PEFT know a default for model_type {model_type!r}" if use_peft_mapping
                 else f"(model_type {model_type!r})")
    raise ValueError(f"no default target_modules for {type(model).__name__}: it has none of the layer sets {tried}, "
                     f"{peft_part}; pass target_modules naming some of its linear layers: "
                     f"{linear_module_summary(model)}")


def resolve_target_modules(model: nn.Module, targets: list[str] | str | None,
                           preferred: Sequence[list[str]] = PAPER_TARGET_MODULES,
                           use_peft_mapping: bool = True) -> list[str] | str:
    """``targets`` as given, or ``default_target_modules(model, ...)`` when it is None."""
    if targets is None:
        return default_target_modules(model, preferred, use_peft_mapping)
    return targets


def with_resolved_targets(model: nn.Module, config, preferred: Sequence[list[str]] = PAPER_TARGET_MODULES,
                          use_peft_mapping: bool = True):
    """``config`` itself when it names its targets, else a copy whose ``target_modules`` is the model's default
    (so a saved config records the layers that were adapted)."""
    if config.target_modules is not None:
        return config
    return dataclasses.replace(config, target_modules=default_target_modules(model, preferred, use_peft_mapping))


def find_target_modules(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the nn.Linear / Conv1D modules of ``model`` that ``targets`` selects; a clear error if none."""
    linear_names = adaptable_module_names(model)
    found = [n for n in linear_names if matches_target(n, targets)]
    if isinstance(targets, list):
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_names)]
        if missing:
            raise ValueError(f"target_modules {missing} match no linear module of {type(model).__name__}; "
                             f"linear modules it has: {linear_module_summary(model)}")
    if not found:
        raise ValueError(f"target_modules {targets!r} match no linear module of {type(model).__name__}; "
                         f"linear modules it has: {linear_module_summary(model)}")
    return found


def inject_linear_layers(model: nn.Module, targets: list[str] | str,
                         make_layer: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """Freeze every parameter of ``model``, then replace each target ``nn.Linear`` / ``Conv1D`` by
    ``make_layer(layer)``.

    Returns ``{module name: new layer}``; a target that matches nothing is a ValueError listing the
    linear modules the model has (``find_target_modules``). A fused projection (``qkv_proj``,
    ``query_key_value``, ``gate_up_proj``, ``c_attn``) is one layer and is adapted whole, as PEFT does.
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

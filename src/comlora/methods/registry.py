"""The method registry: name -> config dataclass, model class, and how ``comlora train``'s options fill the config.

Every method model builds on ``methods.base.AdapterModel``: ``.model`` (the causal LM with its layers injected),
``training_loss(input_ids, attention_mask, labels, step, total_steps) -> (loss, parts)``, ``parameter_counts()``,
``save(path)``, ``load(base, path)``, ``mergeable`` and the hooks training, export and evaluation call (components,
merge, LoRA weights, the per-step callback, the end of a run). A new method is one module plus one line in
``METHODS`` (docs/extending.md).
"""

from __future__ import annotations

import pkgutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Method:
    """One training method. ``config`` and ``model`` name its config dataclass and its model class as
    ``module:Class``, imported when first used (``config_class``, ``model_class``): listing the methods (the command
    line's choices) loads no model code. ``components_field`` is the config field that ``--num-components`` (K)
    fills (None: the method has no K); ``fixed`` are config values its name implies (dora: use_dora=True);
    ``option_flags`` are config fields with a ``comlora train`` flag of their own (``--top-n``, filling
    ``method_options``; the config's module must then import no torch: the parser reads the fields)."""

    config: str
    model: str
    description: str
    components_field: str | None = None
    fixed: dict = field(default_factory=dict)
    option_flags: tuple[str, ...] = ()

    @property
    def config_class(self) -> type:
        return pkgutil.resolve_name(self.config)

    @property
    def model_class(self) -> type:
        return pkgutil.resolve_name(self.model)

    @property
    def mergeable(self) -> bool:
        return self.model_class.mergeable

    @property
    def selects_winner(self) -> bool:
        """Its components compete and the run's result is the winner (``AdapterConfig.selects_winner``)."""
        return self.config_class.selects_winner


METHODS: dict[str, Method] = {
    "comlora": Method("comlora.methods.comlora.config:ComLoraConfig", "comlora.methods.comlora.model:ComLoraModel",
                      "Competitive LoRA: K components compete under a selector; the winner is exported as one LoRA",
                      "num_components", option_flags=("top_n", "noise_alpha", "anneal")),
    "lora": Method("comlora.methods.lora:PeftLoraConfig", "comlora.methods.lora:PeftLoraModel", "Plain LoRA (PEFT)"),
    "dora": Method("comlora.methods.lora:PeftLoraConfig", "comlora.methods.lora:PeftLoraModel",
                   "DoRA (PEFT's use_dora)", fixed={"use_dora": True}),
    "moelora": Method("comlora.methods.moelora:MoeLoraConfig", "comlora.methods.moelora:MoeLoraModel",
                      "Mixture of K LoRA experts with a per-token router", "num_experts"),
    "teamlora": Method("comlora.methods.teamlora:TeamLoraConfig", "comlora.methods.teamlora:TeamLoraModel",
                       "TeamLoRA: K experts sharing one A, routed through an interaction matrix", "num_experts"),
    "loratrf": Method("comlora.methods.loratrf:LoraTrfConfig", "comlora.methods.loratrf:LoraTrfModel",
                      "LoRATRF: LoRA plus a task-aware filter on every decoder layer"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_config(cfg):
    """The method's config dataclass from a TrainConfig: every TrainConfig field that is also a field of the
    method's config (r, lora_alpha, lora_dropout, target_modules, seed; comlora's top_n, noise_alpha, anneal),
    ``num_components`` as the method's K, the values its name fixes, then ``method_options``."""
    method = get_method(cfg.method)
    own = {f.name for f in fields(method.config_class)}
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in own}
    if method.components_field is not None:
        values[method.components_field] = cfg.num_components
    for name in method.fixed:
        if name in cfg.method_options:
            raise ValueError(f"method {cfg.method} sets {name}={method.fixed[name]!r}; "
                             "it cannot be changed in method_options")
    return method.config_class.from_dict({**values, **method.fixed, **cfg.method_options})


def build_method(cfg, model: nn.Module) -> nn.Module:
    """A fresh method model on ``model`` (whose weights it freezes)."""
    return get_method(cfg.method).model_class(model, method_config(cfg))


def load_method(cfg, model: nn.Module, path: str | Path) -> nn.Module:
    """The method model saved in ``path`` by ``save``, rebuilt on ``model``."""
    return get_method(cfg.method).model_class.load(model, path)

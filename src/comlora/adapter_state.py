"""What the related methods (MoELoRA, TeamLoRA, LoRATRF; spec section 10) share: injection into a frozen
causal LM, the L_LM loss, parameter counts, and save / load of the trainable tensors (config JSON + safetensors)."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from .losses import sequence_losses
from .model import find_target_modules
from .storage import write_json, write_safetensors


class ConfigDict:
    """``to_dict`` / ``from_dict`` / ``from_json`` for a config dataclass; an unknown field is an error naming it."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


def inject_linear_layers(model: nn.Module, targets: list[str] | str,
                         make_layer: Callable[[nn.Linear], nn.Module]) -> dict[str, nn.Module]:
    """Freeze every parameter of ``model``, then replace each target ``nn.Linear`` by ``make_layer(linear)``.

    Returns ``{module name: new layer}``; a target that matches nothing is a ValueError listing the
    linear modules the model has (``model.find_target_modules``).
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


def mean_lm_loss(causal_lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """L_LM = mean over samples with a target token of the per-sample mean NLL (ComLoRA's Eq. 4 with K = 1).

    Returns ``(L_LM, number of target tokens)``.
    """
    losses, counts = sequence_losses(causal_lm, input_ids, attention_mask, labels)
    valid = counts > 0
    if not bool(valid.any()):
        raise ValueError("the batch has no target token at all (every label is -100): check the label masking "
                         "and cutoff_len; prompts longer than cutoff_len leave no response token")
    return losses[valid, 0].mean(), int(counts.sum())


@torch.no_grad()
def load_state_tensors(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], source: str = "state") -> None:
    """Copy ``saved`` into ``expected``; every missing, unexpected or wrongly shaped tensor is named in one error."""
    problems = [f"missing {k}" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    problems += [f"{k}: saved shape {list(saved[k].shape)}, this model expects {list(v.shape)}"
                 for k, v in expected.items() if k in saved and saved[k].shape != v.shape]
    if problems:
        raise ValueError(f"{source} does not fit this base model (was it saved from another one?):\n  "
                         + "\n  ".join(problems))
    for k, v in expected.items():
        v.copy_(saved[k])


class AdapterModel(nn.Module):
    """Base of the related methods' wrappers: ``.model`` is the causal LM with the method's modules injected.

    A subclass sets ``config_class`` and ``state_name``, injects its modules in ``__init__`` and records
    each in ``self.injected`` (name inside ``.model`` -> module). Tensors named ``lora_*`` count as the
    adapter, every other tensor the method adds (router, interaction matrix, filter) as the router.
    """

    mergeable = False
    config_class: type
    state_name: str

    def __init__(self, model: nn.Module, config) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.injected: dict[str, nn.Module] = {}

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    # ---- parameters ----------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """{"adapter": the lora_* tensors, "router": the method's other tensors}, keyed by their name in ``.model``."""
        groups = {"adapter": {}, "router": {}}
        for prefix, module in self.injected.items():
            for name, p in module.named_parameters():
                if not name.startswith("base_layer."):
                    groups["adapter" if name.startswith("lora_") else "router"][f"{prefix}.{name}"] = p
        return groups

    def state_tensors(self) -> dict[str, torch.Tensor]:
        groups = self.parameter_groups()
        return {**groups["adapter"], **groups["router"]}

    def parameter_counts(self) -> dict[str, int]:
        """{"adapter": LoRA / expert weights, "router": router, interaction or filter, "base": the frozen base model}."""
        groups = self.parameter_groups()
        added = {id(p) for group in groups.values() for p in group.values()}
        counts = {key: sum(p.numel() for p in group.values()) for key, group in groups.items()}
        counts["base"] = sum(p.numel() for p in self.model.parameters() if id(p) not in added)
        return counts

    def print_trainable_parameters(self) -> None:
        """Adapter and router parameters as counts and % of the base model."""
        c = self.parameter_counts()
        adapter, router = 100 * c["adapter"] / c["base"], 100 * c["router"] / c["base"]
        print(f"trainable params ({self.state_name}): adapter {c['adapter']:,} ({adapter:.4f}%) | "
              f"router {c['router']:,} ({router:.4f}%) | base (frozen) {c['base']:,}")

    # ---- save / load ---------------------------------------------------------------------
    @classmethod
    def _files(cls, path: Path) -> tuple[Path, Path]:
        return path / f"{cls.state_name}_config.json", path / f"{cls.state_name}_model.safetensors"

    def save(self, path: str | Path) -> Path:
        """``<state_name>_config.json`` (the config) + ``<state_name>_model.safetensors`` (every added tensor)."""
        path = Path(path)
        config_file, weights_file = self._files(path)
        write_safetensors(weights_file, self.state_tensors())
        write_json(config_file, {"method": self.state_name, "config": self.config.to_dict(),
                                 "base_model_name_or_path": getattr(self.model, "name_or_path", None)})
        return path

    @classmethod
    def load(cls, model: nn.Module, path: str | Path):
        """Rebuild a saved wrapper on ``model`` (the same base it was trained on)."""
        path = Path(path)
        config_file, weights_file = cls._files(path)
        for f in (config_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"{path} is not a saved {cls.__name__}: {f.name} is missing")
        meta = json.loads(config_file.read_text())
        wrapper = cls(model, cls.config_class.from_dict(meta["config"]))
        load_state_tensors(wrapper.state_tensors(), load_file(str(weights_file)), source=str(path))
        return wrapper

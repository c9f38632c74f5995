"""AdapterModel: what the related methods' wrappers (MoELoRA, TeamLoRA, LoRATRF; spec section 10) share:
pass-through inference, parameter counts, and save / load of the trainable tensors (config JSON + safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from comlora.methods.checkpointing import ActivationCheckpointing
from comlora.methods.saved_state import check_weights_fit, config_from_file
from comlora.storage import load_state_tensors, read_json_object, read_safetensors, write_json, write_safetensors


class AdapterModel(ActivationCheckpointing, nn.Module):
    """Base of the related methods' wrappers: ``.model`` is the causal LM with the method's modules injected.

    A subclass sets ``config_class``, ``state_name`` and ``mergeable``, injects its modules in ``__init__`` and records
    each in ``self.injected`` (name inside ``.model`` -> module). Tensors named ``lora_*`` count as the
    adapter, every other tensor the method adds (router, interaction matrix, filter) as the router.
    """

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
        """{"adapter": trainable LoRA / expert weights, "router": trainable router, interaction matrix or filter,
        "base": the frozen base model (without the adapter's tensors)}. A tensor the method adds but keeps frozen
        (TeamLoRA's M with ``interaction_matrix="frozen"``) is saved with the state and counted in none of them."""
        groups = self.parameter_groups()
        added = {id(p) for group in groups.values() for p in group.values()}
        counts = {key: sum(p.numel() for p in group.values() if p.requires_grad) for key, group in groups.items()}
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
        meta = read_json_object(config_file, "config")
        config = config_from_file(cls.config_class, meta["config"], config_file)
        check_weights_fit(lambda m: cls(m, config), model, weights_file, config_file)
        wrapper = cls(model, config)
        load_state_tensors(wrapper.state_tensors(), read_safetensors(weights_file), source=str(path))
        return wrapper

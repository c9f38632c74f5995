"""Every training method behind one interface, built from a TrainConfig.

A method model has ``.model`` (the causal LM with its layers injected), ``training_loss(input_ids,
attention_mask, labels, step, total_steps) -> (loss, parts)``, ``parameter_counts()``, ``save(path)``
and ``load(base, path)``, and a class attribute ``mergeable``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from comlora.methods.checkpointing import ActivationCheckpointing
from comlora.methods.comlora.config import ComLoraConfig
from comlora.methods.injection import find_target_modules, resolve_target_modules
from comlora.methods.loratrf import LoraTrfConfig, LoraTrfModel
from comlora.methods.losses import mean_lm_loss
from comlora.methods.comlora.model import ComLoraModel
from comlora.methods.moelora import MoeLoraConfig, MoeLoraModel
from comlora.methods.teamlora import TeamLoraConfig, TeamLoraModel
from comlora.methods.saved_state import load_peft_adapter
from comlora.training.config import TrainConfig


class PeftLoraModel(ActivationCheckpointing, nn.Module):
    """Plain LoRA (or DoRA) from PEFT; its saved state is a standard PEFT adapter folder."""

    mergeable = True

    def __init__(self, peft_model: PeftModel) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.model = peft_model.base_model.model

    @classmethod
    def create(cls, model: nn.Module, r: int, lora_alpha: float, lora_dropout: float,
               target_modules: list[str] | str | None = None, use_dora: bool = False, seed: int = 0) -> "PeftLoraModel":
        """PEFT's LoRA / DoRA on ``target_modules`` (None: the architecture's default, as for every method here;
        ``fan_in_fan_out`` set for GPT-2's Conv1D layers)."""
        target_modules = resolve_target_modules(model, target_modules)
        conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n in find_target_modules(model, target_modules))
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                            bias="none", task_type="CAUSAL_LM", use_dora=use_dora, fan_in_fan_out=conv1d)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(get_peft_model(model, config))

    def forward(self, *args, **kwargs):
        return self.peft_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.peft_model.generate(*args, **kwargs)

    def training_loss(self, input_ids, attention_mask, labels, step: int, total_steps: int):
        loss, target_tokens = mean_lm_loss(self.model, input_ids, attention_mask, labels)
        return loss, {"lm": float(loss.detach()), "loss": float(loss.detach()), "target_tokens": target_tokens}

    def parameter_counts(self) -> dict[str, int]:
        adapter = sum(p.numel() for p in self.peft_model.parameters() if p.requires_grad)
        base = sum(p.numel() for n, p in self.peft_model.named_parameters() if not p.requires_grad)
        return {"adapter": adapter, "router": 0, "base": base}

    def save(self, path: str | Path) -> Path:
        # no embedding-layer check: it would look the base model up on the Hub
        self.peft_model.save_pretrained(path, save_embedding_layers=False)
        return Path(path)

    @classmethod
    def load(cls, model: nn.Module, path: str | Path) -> "PeftLoraModel":
        return cls(load_peft_adapter(model, path, is_trainable=True))


def method_config(cfg: TrainConfig):
    """The method's config dataclass from the run's shared options plus its ``method_options``."""
    shared = dict(lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, seed=cfg.seed)
    if cfg.target_modules is not None:
        shared["target_modules"] = cfg.target_modules
    if cfg.method == "comlora":
        values = dict(num_components=cfg.num_components, r=cfg.r, top_n=cfg.top_n,
                      noise_alpha=cfg.noise_alpha, anneal=cfg.anneal)
        return ComLoraConfig.from_dict({**shared, **values, **cfg.method_options})
    if cfg.method == "moelora":
        return MoeLoraConfig.from_dict({**shared, "num_experts": cfg.num_components, "r": cfg.r, **cfg.method_options})
    if cfg.method == "teamlora":
        return TeamLoraConfig.from_dict({**shared, "num_experts": cfg.num_components, "r_B": cfg.r, **cfg.method_options})
    if cfg.method == "loratrf":
        return LoraTrfConfig.from_dict({**shared, "r": cfg.r, **cfg.method_options})
    raise ValueError(f"method {cfg.method!r} has no config dataclass")


WRAPPERS = {"comlora": ComLoraModel, "moelora": MoeLoraModel, "teamlora": TeamLoraModel, "loratrf": LoraTrfModel}


def build_method(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """A fresh method model on ``model`` (whose weights it freezes)."""
    if cfg.method in ("lora", "dora"):
        if cfg.method_options:
            raise ValueError(f"method {cfg.method} takes no method_options, got {sorted(cfg.method_options)}")
        return PeftLoraModel.create(model, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
                                    use_dora=cfg.method == "dora", seed=cfg.seed)
    return WRAPPERS[cfg.method](model, method_config(cfg))


def load_method(cfg: TrainConfig, model: nn.Module, path: str | Path) -> nn.Module:
    """The method model saved in ``path`` by ``save``, rebuilt on ``model``."""
    if cfg.method in ("lora", "dora"):
        return PeftLoraModel.load(model, path)
    return WRAPPERS[cfg.method].load(model, path)

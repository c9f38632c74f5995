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

from .config import ComLoraConfig
from .losses import sequence_losses
from .model import ComLoraModel
from .train_config import TrainConfig


def mean_lm_loss(causal_lm, input_ids, attention_mask, labels) -> torch.Tensor:
    """L_LM = mean over samples with a target token of the per-sample mean NLL (ComLoRA's Eq. 4 with K = 1)."""
    losses, counts = sequence_losses(causal_lm, input_ids, attention_mask, labels)
    valid = counts > 0
    if not bool(valid.any()):
        raise ValueError("the batch has no target token at all (every label is -100): check the label masking and cutoff_len")
    return losses[valid, 0].mean()


class PeftLoraModel(nn.Module):
    """Plain LoRA (or DoRA) from PEFT; its saved state is a standard PEFT adapter folder."""

    mergeable = True

    def __init__(self, peft_model: PeftModel) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.model = peft_model.base_model.model

    @classmethod
    def create(cls, model: nn.Module, r: int, lora_alpha: float, lora_dropout: float, target_modules: list[str],
               use_dora: bool = False, seed: int = 0) -> "PeftLoraModel":
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                            bias="none", task_type="CAUSAL_LM", use_dora=use_dora)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(get_peft_model(model, config))

    def forward(self, *args, **kwargs):
        return self.peft_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.peft_model.generate(*args, **kwargs)

    def training_loss(self, input_ids, attention_mask, labels, step: int, total_steps: int):
        loss = mean_lm_loss(self.model, input_ids, attention_mask, labels)
        return loss, {"lm": float(loss.detach()), "loss": float(loss.detach()),
                      "target_tokens": int((labels[:, 1:] != -100).sum())}

    def parameter_counts(self) -> dict[str, int]:
        adapter = sum(p.numel() for p in self.peft_model.parameters() if p.requires_grad)
        base = sum(p.numel() for n, p in self.peft_model.named_parameters() if not p.requires_grad)
        return {"adapter": adapter, "router": 0, "base": base}

    def save(self, path: str | Path) -> Path:
        self.peft_model.save_pretrained(path)
        return Path(path)

    @classmethod
    def load(cls, model: nn.Module, path: str | Path) -> "PeftLoraModel":
        return cls(PeftModel.from_pretrained(model, path, is_trainable=True))


def comlora_config(cfg: TrainConfig) -> ComLoraConfig:
    values = dict(num_components=cfg.num_components, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                  target_modules=cfg.target_modules, top_n=cfg.top_n or cfg.num_components,
                  noise_alpha=cfg.noise_alpha, anneal=cfg.anneal, seed=cfg.seed)
    return ComLoraConfig.from_dict({**values, **cfg.method_options})


def build_method(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """A fresh method model on ``model`` (whose weights it freezes)."""
    if cfg.method == "comlora":
        return ComLoraModel(model, comlora_config(cfg))
    if cfg.method in ("lora", "dora"):
        if cfg.method_options:
            raise ValueError(f"method {cfg.method} takes no method_options, got {sorted(cfg.method_options)}")
        return PeftLoraModel.create(model, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
                                    use_dora=cfg.method == "dora", seed=cfg.seed)
    raise ValueError(f"method {cfg.method!r} is not wired into training yet")


def load_method(cfg: TrainConfig, model: nn.Module, path: str | Path) -> nn.Module:
    """The method model saved in ``path`` by ``save``, rebuilt on ``model``."""
    if cfg.method == "comlora":
        return ComLoraModel.load(model, path)
    if cfg.method in ("lora", "dora"):
        return PeftLoraModel.load(model, path)
    raise ValueError(f"method {cfg.method!r} is not wired into loading yet")

"""What every adapted layer shares (the frozen base layer, its sizes, the scaling and dropout, LoRA's
initialisation) and LoraLinear, the plain one-adapter LoRA layer."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

ADAPTABLE_LAYERS = (nn.Linear, Conv1D)


def linear_dims(layer: nn.Module, adapter: str) -> tuple[int, int, bool]:
    """``(d_in, d_out, fan_in_fan_out)`` of an ``nn.Linear`` (weight ``[d_out, d_in]``) or a transformers
    ``Conv1D`` (GPT-2 family: weight ``[d_in, d_out]``, PEFT's ``fan_in_fan_out``); any other layer is a TypeError."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out, True
    raise TypeError(f"{adapter} adapts torch.nn.Linear and transformers' Conv1D layers only, got {type(layer).__name__}")


@torch.no_grad()
def uniform_fan_in_(p: torch.Tensor, fan_in: int) -> None:
    """p ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PEFT's kaiming_uniform_(a=sqrt(5)) for lora_A, nn.Linear's default.
    Drawn on the CPU from the global generator, so a seed gives the same weights on every device."""
    bound = 1.0 / math.sqrt(fan_in)
    p.copy_((torch.rand(p.shape, dtype=torch.float32) * 2 - 1) * bound)


class AdaptedLinear(nn.Module):
    """Base of every adapted layer: ``base_layer`` (a frozen ``nn.Linear`` or GPT-2 ``Conv1D``), ``d_in``, ``d_out``,
    ``fan_in_fan_out``, ``r``, ``scaling = lora_alpha / r`` and the dropout on the adapter's input."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0) -> None:
        super().__init__()
        self.d_in, self.d_out, self.fan_in_fan_out = linear_dims(base_layer, type(self).__name__)
        self.base_layer = base_layer
        self.r = r
        self.scaling = lora_alpha / r
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    @property
    def device(self) -> torch.device:
        return self.base_layer.weight.device


class LoraLinear(AdaptedLinear):
    """y = W0 x + (alpha / r) * B^T A^T x, with ``lora_A`` ``[d_in, r]`` and ``lora_B`` ``[r, d_out]``."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout)
        self.lora_A = nn.Parameter(torch.empty(self.d_in, r, device=self.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(r, self.d_out, device=self.device, dtype=torch.float32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)); B = 0: the layer starts as the base layer."""
        uniform_fan_in_(self.lora_A, self.d_in)
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        delta = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A) @ self.lora_B
        return result + (self.scaling * delta).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"

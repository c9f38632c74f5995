"""What every adapted layer shares: AdaptedLinear (the frozen base layer, its sizes, the scaling and dropout),
StackedLoraLinear (K stacked LoRA pairs, their initialisation and scaled update) and LoraLinear, one plain pair."""

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
    raise TypeError(f"{adapter} adapts torch.nn.Linear and transformers' Conv1D layers only, "
                    f"got {type(layer).__name__}")


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


class StackedLoraLinear(AdaptedLinear):
    """K stacked LoRA pairs on one frozen layer, the base of every adapted layer here: ``lora_A`` ``[K, d_in, r]`` and
    ``lora_B`` ``[K, r, d_out]``, float32 on the base layer's device; pair k adds scaling * B_k^T A_k^T x.

    ``num_adapters=None`` is one unstacked pair (``[d_in, r]``, ``[r, d_out]``: plain LoRA); ``share_A`` makes A one
    ``[d_in, K*r]`` matrix whose K column slices are the A_k (TeamLoRA). A subclass adds its other tensors, then calls
    ``reset_parameters`` (the order of the random draws is the order there)."""

    def __init__(self, base_layer: nn.Module, num_adapters: int | None, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, share_A: bool = False) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout)
        if share_A and num_adapters is None:
            raise ValueError("share_A splits one A among K stacked pairs: it needs num_adapters")
        self.num_adapters, self.share_A = num_adapters, share_A
        stack = () if num_adapters is None else (num_adapters,)
        a_shape = (self.d_in, num_adapters * r) if share_A else (*stack, self.d_in, r)
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=self.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(*stack, r, self.d_out, device=self.device, dtype=torch.float32))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every A_k ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) independently (PEFT's kaiming_uniform_(a=sqrt(5)) on its
        [r, d_in] lora_A); B = 0: the layer starts as the base layer."""
        uniform_fan_in_(self.lora_A, self.d_in)
        self.lora_B.zero_()

    def adapter_outputs(self, h: torch.Tensor) -> torch.Tensor:
        """z_k = A_k^T h of every stacked pair, ``[..., K, r]`` (a shared A: the K slices of h A)."""
        if self.share_A:
            return (h @ self.lora_A).unflatten(-1, (self.num_adapters, self.r))
        return torch.einsum("...i,kir->...kr", h, self.lora_A)

    def mixed_update(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k w_k B_k^T z_k per token, from ``z [..., K, r]`` and ``weights [..., K]``: ``[..., d_out]``."""
        return torch.einsum("...kr,kro->...o", z * weights.unsqueeze(-1), self.lora_B)

    def add_update(self, result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """W0 x + scaling * delta, in the base layer's output dtype."""
        return result + (self.scaling * delta).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


class LoraLinear(StackedLoraLinear):
    """y = W0 x + (alpha / r) * B^T A^T x, with ``lora_A`` ``[d_in, r]`` and ``lora_B`` ``[r, d_out]``."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0) -> None:
        super().__init__(base_layer, None, r, lora_alpha, lora_dropout)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return self.add_update(result, (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A) @ self.lora_B)

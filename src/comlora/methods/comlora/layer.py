"""ComLoraLinear: one frozen linear layer with K stacked LoRA components (docs/method.md)."""

from __future__ import annotations

import torch
from torch import nn

from comlora.methods.lora_layer import StackedLoraLinear


class ComLoraLinear(StackedLoraLinear):
    """y = W0 x + (alpha / r) * B_k^T A_k^T x, for one component k or for all K at once.

    The base is an ``nn.Linear`` or a GPT-2 ``Conv1D`` (``fan_in_fan_out``: its weight is ``[d_in, d_out]``).
    ``lora_A`` is ``[K, d_in, r]`` and ``lora_B`` is ``[K, r, d_out]``. Modes:

    - ``competition``: the input batch is the real batch replicated K times along dim 0;
      slice k (rows k*B .. (k+1)*B-1) goes through component k, all in one batched matmul;
    - ``active_component = k``: every row goes through component k;
    - neither: the frozen base layer alone.
    """

    def __init__(self, base_layer: nn.Module, num_components: int, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0) -> None:
        super().__init__(base_layer, num_components, r, lora_alpha, lora_dropout)
        self.competition = False
        self.active_component: int | None = None
        self.reset_parameters()

    def delta_weight(self, component: int) -> torch.Tensor:
        """scaling * (A_k B_k)^T shaped like an nn.Linear weight [d_out, d_in]; scaling * A_k B_k [d_in, d_out] for a
        Conv1D."""
        delta = self.scaling * (self.lora_A[component] @ self.lora_B[component])
        return delta if self.fan_in_fan_out else delta.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.competition and self.active_component is None:
            return result
        h = self.dropout(x).to(self.lora_A.dtype)
        if self.competition:
            k = self.num_adapters
            if h.shape[0] % k:
                raise ValueError(f"competition forward needs a batch of K*B rows (K={k}), got {h.shape[0]}")
            low = torch.bmm(h.reshape(k, -1, h.shape[-1]), self.lora_A) * self.scaling   # [K, B*L, r]
            lora_B = self.lora_B
        else:
            low = (h @ self.lora_A[self.active_component]).reshape(1, -1, self.r) * self.scaling
            lora_B = self.lora_B[self.active_component].unsqueeze(0)
        if result.dtype == low.dtype:       # W0 x + low B in one op: no [K*B*L, d_out] temporaries
            return torch.baddbmm(result.view(low.shape[0], -1, result.shape[-1]), low, lora_B).view(result.shape)
        return result + torch.bmm(low, lora_B).reshape(result.shape).to(result.dtype)

    def extra_repr(self) -> str:
        return f"num_components={self.num_adapters}, r={self.r}, scaling={self.scaling:g}"

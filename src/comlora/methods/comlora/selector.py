"""LoraSelector: scores how well each of the K components suits a sequence (docs/method.md, Eq. 1-3)."""

from __future__ import annotations

import torch
from torch import nn


class LoraSelector(nn.Module):
    """sim[b, k] = h_avg[b] . E[k], with h_avg the masked mean over tokens of a Transformer
    encoder layer applied to the (frozen) input token embeddings."""

    def __init__(self, hidden_size: int, num_components: int, selector_dim: int | None = None,
                 num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1, init_std: float = 0.02) -> None:
        super().__init__()
        dim = selector_dim or hidden_size
        if dim % num_heads:
            raise ValueError(f"selector width {dim} is not divisible by selector_heads={num_heads}; "
                             f"set selector_heads to a divisor of {dim} or choose selector_dim")
        self.input_proj = nn.Linear(hidden_size, dim) if dim != hidden_size else nn.Identity()
        self.encoder = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=ffn_dim, dropout=dropout,
                                                  batch_first=True)
        self.component_embeddings = nn.Parameter(torch.randn(num_components, dim) * init_std)

    def pool(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """h_avg[b] = sum_t m[b,t] h[b,t] / sum_t m[b,t] (Eq. 1)."""
        x = self.input_proj(embeddings.to(self.component_embeddings.dtype))
        mask = attention_mask.bool()
        hidden = self.encoder(x, src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, d] embeddings, [B, L] mask -> sim [B, K] (Eq. 2-3)."""
        return self.pool(embeddings, attention_mask) @ self.component_embeddings.T

"""MoELoRA: K LoRA experts per adapted linear layer, mixed per token by a softmax router (spec section 10).

Not mergeable: the router weights depend on the input token, so no fixed weight update reproduces a layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter_state import AdapterModel
from .injection import inject_linear_layers, with_resolved_targets
from .layers import linear_dims
from .losses import mean_lm_loss
from .config import TARGET_MODULES_HELP, ConfigDict


@dataclass
class MoeLoraConfig(ConfigDict):
    """Configuration of a mixture of K LoRA experts of rank r per target module."""

    num_experts: int = field(default=4, metadata={"help": "K: LoRA experts per adapted layer."})
    r: int = field(default=8, metadata={"help": "Rank of every expert."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: the update is (lora_alpha / r) * sum_k g_k B_k^T A_k^T x."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input x (0 = off; the router sees x without it)."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": TARGET_MODULES_HELP})
    top_k: int | None = field(default=None, metadata={"help": "None = dense routing (every expert, softmax weights); k = keep the k largest weights per token, renormalised to sum to 1."})
    load_balance_weight: float = field(default=0.0, metadata={"help": "Weight of the Switch-Transformer load-balancing loss in the total loss (0 = off; it is still logged)."})
    seed: int = field(default=0, metadata={"help": "Seed of the expert and router initialisation."})

    def __post_init__(self) -> None:
        k = self.num_experts
        checks = self.adapter_checks("num_experts", "r") + [
            (self.top_k is None or (isinstance(self.top_k, int) and 1 <= self.top_k <= max(k, 1)),
             f"top_k must be None (dense) or an integer in 1..K={k}, got {self.top_k!r}"),
            (self.load_balance_weight >= 0, f"load_balance_weight must be >= 0, got {self.load_balance_weight!r}"),
        ]
        self.validate(checks)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


class MoeLoraLinear(nn.Module):
    """y = W0 x + (alpha / r) * sum_k g_k(x) B_k^T A_k^T x, with g(x) = softmax(W_g x) per token.

    ``lora_A`` is ``[K, d_in, r]``, ``lora_B`` is ``[K, r, d_out]``, the router ``W_g`` is a bias-free
    ``Linear(d_in -> K)``. With ``top_k`` only the k largest softmax weights of a token are kept,
    renormalised to sum to 1 (the other experts get weight 0; all K are still computed, densely).
    While ``record_router`` is True the full softmax probabilities are kept in ``router_probs``.
    """

    def __init__(self, base_layer: nn.Module, num_experts: int, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, top_k: int | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_experts, self.r, self.top_k = num_experts, r, top_k
        self.scaling = lora_alpha / r
        d_in, d_out, _ = linear_dims(base_layer, "MoeLoraLinear")
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(num_experts, d_in, r, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, r, d_out, device=device, dtype=torch.float32))
        self.router = torch.nn.utils.skip_init(nn.Linear, d_in, num_experts, bias=False, device=device,
                                               dtype=torch.float32)
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.record_router = False
        self.router_probs: torch.Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A_k and the router ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's / nn.Linear's
        kaiming_uniform_(a=sqrt(5))); B_k = 0.

        Drawn on the CPU from the global generator, so a seed gives the same weights on every device.
        """
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        for p in (self.lora_A, self.router.weight):
            p.copy_((torch.rand(p.shape, dtype=torch.float32) * 2 - 1) * bound)
        self.lora_B.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax probabilities, gates g) per token, both ``[..., K]``; g = the probabilities,
        or the top-k of them renormalised to sum to 1 (the rest 0)."""
        probs = torch.softmax(self.router(x), dim=-1)
        if self.top_k is None:
            return probs, probs
        kept, index = probs.topk(self.top_k, dim=-1)
        return probs, torch.zeros_like(probs).scatter(-1, index, kept / kept.sum(-1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        x = x.to(self.lora_A.dtype)
        probs, gates = self.route(x)
        if self.record_router:
            self.router_probs = probs
        z = torch.einsum("...i,kir->...kr", self.dropout(x), self.lora_A)          # z_k = A_k^T x
        delta = torch.einsum("...kr,kro->...o", z * gates.unsqueeze(-1), self.lora_B)  # sum_k g_k B_k^T z_k
        return result + (self.scaling * delta).to(result.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, r={self.r}, top_k={self.top_k}, scaling={self.scaling:g}"


def load_balancing_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over N tokens, ``probs [N, K]``: L_bal = K * sum_k f_k P_k.

    f_k = share of the tokens whose top-1 expert (argmax) is k (no gradient), P_k = mean router
    probability of expert k. It is 1 when both are uniform and K when every token goes to one expert.
    """
    k = probs.shape[-1]
    f = torch.bincount(probs.argmax(-1), minlength=k).to(probs.dtype) / probs.shape[0]
    return k * (f * probs.mean(0)).sum()


class MoeLoraModel(AdapterModel):
    """A frozen causal LM with a MoeLoraLinear on every target module. ``mergeable = False``: the router
    weights depend on the token, so the experts cannot be folded into W0."""

    config_class = MoeLoraConfig
    state_name = "moelora"
    mergeable = False

    def __init__(self, model: nn.Module, config: MoeLoraConfig) -> None:
        config = with_resolved_targets(model, config)
        super().__init__(model, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.injected = inject_linear_layers(model, config.target_modules, lambda linear: MoeLoraLinear(
                linear, config.num_experts, config.r, config.lora_alpha, config.lora_dropout, config.top_k))

    def training_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      step: int, total_steps: int) -> tuple[torch.Tensor, dict]:
        """L = L_LM + w_bal * L_bal; L_bal = mean over the adapted layers of the Switch loss on the
        real (unpadded) tokens of the batch."""
        layers = list(self.injected.values())
        for layer in layers:
            layer.record_router = True
        try:
            lm, target_tokens = mean_lm_loss(self.model, input_ids, attention_mask, labels)
            real = attention_mask.bool()
            balance = torch.stack([load_balancing_loss(layer.router_probs[real]) for layer in layers]).mean()
        finally:
            for layer in layers:
                layer.record_router, layer.router_probs = False, None
        loss = lm + self.config.load_balance_weight * balance if self.config.load_balance_weight > 0 else lm
        return loss, {"lm": float(lm.detach()), "balance": float(balance.detach()), "loss": float(loss.detach()),
                      "target_tokens": target_tokens}


def get_moelora_model(model: nn.Module, config: MoeLoraConfig) -> MoeLoraModel:
    """Freeze ``model`` and put K LoRA experts and a router on every target module."""
    return MoeLoraModel(model, config)

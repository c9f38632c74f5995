"""MoELoRA: K LoRA experts per adapted linear layer, mixed per token by a softmax router (docs/method.md, related
methods).

Not mergeable: the router weights depend on the input token, so no fixed weight update reproduces a layer.

Optional losses: Switch Transformer load balancing, and the contrastive loss among experts of Luo et al.
(2024, "MoELoRA: Contrastive Learning Guided Mixture of Experts...", arXiv 2402.12851): outputs of the same
expert are positives, outputs of different experts negatives (``expert_contrastive_loss``). We could not
read the paper's own equation and settings; docs/spec-notes.md says what is our reading and what is uncertain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from comlora.methods.adapter_config import AdapterConfig
from comlora.methods.base import LayerAdapterModel
from comlora.methods.lora_layer import StackedLoraLinear, uniform_fan_in_
from comlora.methods.losses import mean_lm_loss


@dataclass
class MoeLoraConfig(AdapterConfig):
    """Configuration of a mixture of K LoRA experts of rank r per target module."""

    num_experts: int = field(default=4, metadata={"help": "K: LoRA experts per adapted layer."})
    top_k: int | None = field(default=None, metadata={
        "help": "None = dense routing (every expert, softmax weights); k = keep the k largest weights per token, "
                "renormalised to sum to 1."})
    load_balance_weight: float = field(default=0.0, metadata={
        "help": "Weight of the Switch-Transformer load-balancing loss in the total loss (0 = off; it is still "
                "logged)."})
    contrastive_loss: bool = field(default=False, metadata={
        "help": "Add the contrastive loss among experts of Luo et al. (2024): each (token, expert) output is an "
                "anchor, the same expert's outputs on the other sampled tokens its positives, every other expert's "
                "outputs its negatives (supervised InfoNCE on cosine similarity); logged as 'contrastive'."})
    contrastive_weight: float = field(default=0.01, metadata={
        "help": "Weight of the contrastive loss in the total loss (with contrastive_loss on; 0 = logged only). "
                "Luo et al.'s own value could not be read; 0.01 is our choice (docs/spec-notes.md)."})
    contrastive_temperature: float = field(default=0.07, metadata={
        "help": "Temperature tau dividing the cosine similarities of the contrastive loss (our choice, the common "
                "InfoNCE / SupCon value; see docs/spec-notes.md)."})
    contrastive_tokens: int = field(default=128, metadata={
        "help": "Real (unpadded) tokens of the batch sampled per step for the contrastive loss, the same in every "
                "adapted layer (all of them if fewer): its cost grows with the square of (tokens x routed experts)."})

    def __post_init__(self) -> None:
        k = self.num_experts
        checks = self.adapter_checks("num_experts") + [
            (self.top_k is None or (isinstance(self.top_k, int) and 1 <= self.top_k <= max(k, 1)),
             f"top_k must be None (dense) or an integer in 1..K={k}, got {self.top_k!r}"),
            (self.load_balance_weight >= 0, f"load_balance_weight must be >= 0, got {self.load_balance_weight!r}"),
            (isinstance(self.contrastive_loss, bool),
             f"contrastive_loss must be true or false, got {self.contrastive_loss!r}"),
            (self.contrastive_weight >= 0, f"contrastive_weight must be >= 0, got {self.contrastive_weight!r}"),
            (self.contrastive_temperature > 0,
             f"contrastive_temperature must be > 0, got {self.contrastive_temperature!r}"),
            (not self.contrastive_loss or k >= 2,
             f"contrastive_loss contrasts different experts: it needs num_experts >= 2, got {k!r}"),
        ] + self.integer_checks(["contrastive_tokens"], 2)
        self.validate(checks)



class MoeLoraLinear(StackedLoraLinear):
    """y = W0 x + (alpha / r) * sum_k g_k(x) B_k^T A_k^T x, with g(x) = softmax(W_g x) per token.

    ``lora_A`` is ``[K, d_in, r]``, ``lora_B`` is ``[K, r, d_out]``, the router ``W_g`` is a bias-free
    ``Linear(d_in -> K)``. With ``top_k`` only the k largest softmax weights of a token are kept,
    renormalised to sum to 1 (the other experts get weight 0; all K are still computed, densely).
    While ``record_router`` is True the full softmax probabilities are kept in ``router_probs``; while
    ``contrastive_rows`` holds flat token indices, ``expert_outputs`` keeps those tokens' routed expert outputs.
    """

    def __init__(self, base_layer: nn.Module, num_experts: int, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, top_k: int | None = None) -> None:
        super().__init__(base_layer, num_experts, r, lora_alpha, lora_dropout)
        self.top_k = top_k
        self.router = torch.nn.utils.skip_init(nn.Linear, self.d_in, num_experts, bias=False, device=self.device,
                                               dtype=torch.float32)
        self.record_router = False
        self.router_probs: torch.Tensor | None = None
        self.contrastive_rows: torch.Tensor | None = None
        self.expert_outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A_k, then the router ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's / nn.Linear's
        kaiming_uniform_(a=sqrt(5))); B_k = 0."""
        super().reset_parameters()
        uniform_fan_in_(self.router.weight, self.d_in)

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
        z = self.adapter_outputs(self.dropout(x))                                    # z_k = A_k^T x
        if self.contrastive_rows is not None:
            self.expert_outputs = self.routed_expert_outputs(z, gates)
        return self.add_update(result, self.mixed_update(z, gates))                  # sum_k g_k B_k^T z_k

    def routed_expert_outputs(self, z: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs ``[P, d_out]``, expert index ``[P]``) of the pairs (token n, expert k) with g_k(x_n) > 0 among
        the flat token indices ``contrastive_rows``: output = (alpha / r) B_k^T A_k^T x_n (before the gate)."""
        z_rows = z.flatten(0, -3)[self.contrastive_rows]                                    # [T, K, r]
        outputs = self.scaling * torch.einsum("tkr,kro->tko", z_rows, self.lora_B)          # [T, K, d_out]
        token, expert = (gates.flatten(0, -2)[self.contrastive_rows] > 0).nonzero(as_tuple=True)
        return outputs[token, expert], expert

    def extra_repr(self) -> str:
        return f"num_experts={self.num_adapters}, r={self.r}, top_k={self.top_k}, scaling={self.scaling:g}"


def load_balancing_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over N tokens, ``probs [N, K]``: L_bal = K * sum_k f_k P_k.

    f_k = share of the tokens whose top-1 expert (argmax) is k (no gradient), P_k = mean router
    probability of expert k. It is 1 when both are uniform and K when every token goes to one expert.
    """
    k = probs.shape[-1]
    f = torch.bincount(probs.argmax(-1), minlength=k).to(probs.dtype) / probs.shape[0]
    return k * (f * probs.mean(0)).sum()


def expert_contrastive_loss(outputs: torch.Tensor, experts: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised InfoNCE over expert outputs, the expert index as the label (Khosla et al.'s L_out):

        L = mean over anchors a with a positive of
            -1/|P(a)| sum_{p in P(a)} log( exp(s_ap / tau) / sum_{b != a} exp(s_ab / tau) )

    with s_ab the cosine similarity of outputs a and b and P(a) the other outputs of a's expert. ``outputs
    [P, d]``, ``experts [P]``; 0 (still in the graph) when no output has a positive.
    """
    outputs = outputs.to(torch.promote_types(outputs.dtype, torch.float32))
    unit = F.normalize(outputs, dim=-1)
    others = ~torch.eye(len(experts), dtype=torch.bool, device=experts.device)
    sim = (unit @ unit.T / temperature).masked_fill(~others, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=-1, keepdim=True)
    positive = (experts.unsqueeze(0) == experts.unsqueeze(1)) & others
    count = positive.sum(-1)
    anchors = count > 0
    if not anchors.any():
        return outputs.sum() * 0
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(-1)[anchors] / count[anchors]
    return per_anchor.mean()


class MoeLoraModel(LayerAdapterModel):
    """A frozen causal LM with a MoeLoraLinear on every target module. ``mergeable = False``: the router
    weights depend on the token, so the experts cannot be folded into W0."""

    config_class = MoeLoraConfig
    state_name = "moelora"
    mergeable = False

    def make_layer(self, layer: nn.Module) -> MoeLoraLinear:
        cfg = self.config
        return MoeLoraLinear(layer, cfg.num_experts, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.top_k)

    def training_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      step: int, total_steps: int) -> tuple[torch.Tensor, dict]:
        """L = L_LM + w_bal * L_bal (+ w_con * L_con with ``contrastive_loss``); L_bal = mean over the adapted
        layers of the Switch loss on the real (unpadded) tokens of the batch; L_con = mean over the adapted layers
        of ``expert_contrastive_loss`` on the routed expert outputs of ``contrastive_tokens`` sampled real tokens."""
        cfg = self.config
        layers = list(self.injected.values())
        rows = self.contrastive_sample(attention_mask, step) if cfg.contrastive_loss else None
        for layer in layers:
            layer.record_router, layer.contrastive_rows = True, rows
        try:
            lm, target_tokens = mean_lm_loss(self.model, input_ids, attention_mask, labels)
            real = attention_mask.bool()
            balance = torch.stack([load_balancing_loss(layer.router_probs[real]) for layer in layers]).mean()
            contrastive = None if rows is None else torch.stack(
                [expert_contrastive_loss(*layer.expert_outputs, cfg.contrastive_temperature)
                 for layer in layers]).mean()
        finally:
            for layer in layers:
                layer.record_router, layer.router_probs = False, None
                layer.contrastive_rows, layer.expert_outputs = None, None
        loss = lm + cfg.load_balance_weight * balance if cfg.load_balance_weight > 0 else lm
        parts = {"lm": float(lm.detach()), "balance": float(balance.detach())}
        if contrastive is not None:
            if cfg.contrastive_weight > 0:
                loss = loss + cfg.contrastive_weight * contrastive
            parts["contrastive"] = float(contrastive.detach())
        return loss, {**parts, "loss": float(loss.detach()), "target_tokens": target_tokens}

    def contrastive_sample(self, attention_mask: torch.Tensor, step: int) -> torch.Tensor:
        """Flat indices of at most ``contrastive_tokens`` real tokens, drawn without replacement from a generator
        seeded by ``seed * 1_000_003 + step`` (one stream per (seed, step)): the draw leaves the global RNG
        (dropout) alone and is the same on a resumed run."""
        real_rows = attention_mask.flatten().nonzero().squeeze(1)
        if len(real_rows) <= self.config.contrastive_tokens:
            return real_rows
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        pick = torch.randperm(len(real_rows), generator=generator)[: self.config.contrastive_tokens]
        return real_rows[pick.to(real_rows.device)].sort().values

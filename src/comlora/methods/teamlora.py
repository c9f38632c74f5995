"""TeamLoRA (the paper's Sec. 3.3; docs/method.md): one shared A, K expert matrices B_i, and a
competition module that mixes the experts per token through a learnable interaction matrix M.

Not mergeable: the expert weights omega depend on the input token, so no fixed weight update reproduces a layer.

Reading of the paper (Eq. 8-13) and of the spec:

- collaboration: ``z = x A`` with ``A (d_in x r_A)``, ``r_A = K r_B``, split into K slices ``z_i`` of
  width r_B (Eq. 8), ``h_i = z_i B_i`` with ``B_i (r_B x d_out)`` (Eq. 9);
- competition: ``phi = softmax(S(x))`` per token (Eq. 11), ``omega_i = sum_j M_ij phi_j``, i.e.
  ``omega = M phi`` (Eq. 12). The paper calls S "an MLP" without giving its form; the authors' released
  code (Lin-Tianwei/TeamLoRA, ``lora.py``, ``ShapleyRouter``) uses one bias-free ``Linear(d_in -> K)``, and
  Table 2's parameter shares leave no room for a hidden layer wider than about K, so that is the default
  (``router_hidden_size = 0``); ``router_hidden_size = h`` makes S the MLP ``Linear(d_in -> h)``,
  ``router_activation``, bias-free ``Linear(h -> K)``;
- output ``W0 x + (lora_alpha / r_B) * sum_i omega_i h_i`` (Eq. 13; the scaling is per expert rank,
  as a MoELoRA expert of rank r_B would have);
- "M is initialized with a uniform distribution, with all diagonal elements set to 1": the
  off-diagonal entries are drawn from U(-a, a) and the diagonal is exactly 1. The paper gives no
  range; a = ``interaction_init_range`` = 0.1 by default (the authors' released code draws its
  off-diagonal interactions from U(-0.1, 0.1)); a = 0 makes M the identity (plain softmax routing).
  M is neither renormalised nor constrained during training: Eq. 12 applies it as it is.

The switches of the paper's ablation (Table 4, "Cop" x "Col") and one more: ``interaction_matrix = "off"``
(no M, ``omega = phi``: the rows without the competition module, with ``router_hidden_size = 0``),
``"frozen"`` (M kept at its initialisation), ``share_A = False`` (each expert its own ``A_i (d_in x r_B)``:
the rows without the collaboration module). Note that ``z_i = split(x A)_i = x A[:, slice i]``, so a shared
A is K independent ``A_i`` side by side: ``share_A`` changes the layout, the initial draw and the number of
matmuls, not the function nor its gradients (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from comlora.methods.adapter_config import AdapterConfig
from comlora.methods.base import LayerAdapterModel
from comlora.methods.lora_layer import StackedLoraLinear, uniform_fan_in_

ROUTER_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
INTERACTION_MODES = ("learned", "frozen", "off")


@dataclass
class TeamLoraConfig(AdapterConfig):
    """Configuration of TeamLoRA: K experts of rank r_B sharing one A of rank r_A = K * r_B per target module."""

    num_experts: int = field(default=4, metadata={"help": "K: expert matrices B_i per adapted layer."})
    r: int = field(default=8, metadata={
        "help": "r_B: rank of every expert B_i (the paper's 'Rank' column); the scaling is lora_alpha / r_B."})
    r_A: int | None = field(default=None, metadata={
        "help": "Rank of the shared A; None = K * r_B. If given it must equal K * r_B (a check, not a second knob)."})
    interaction_init_range: float = field(default=0.1, metadata={
        "help": "a: off-diagonal entries of M start ~ U(-a, a); the diagonal starts at 1 (a = 0: M = I)."})
    interaction_matrix: str = field(default="learned", metadata={
        "help": "M of Eq. 12: 'learned' (trained), 'frozen' (kept at its initialisation: no gradient, still saved) or "
                "'off' (no M: omega = phi, plain softmax routing; Table 4's rows without the competition module)."})
    share_A: bool = field(default=True, metadata={
        "help": "True: one A (d_in x K r_B) whose K column slices feed the K experts (Eq. 8-9); False: each expert its "
                "own A_i (d_in x r_B), i.e. K independent LoRAs of rank r_B mixed by omega (Table 4's rows without the "
                "collaboration module). Both compute the same function of the same numbers; see the module docstring."})
    router_hidden_size: int = field(default=0, metadata={
        "help": "Hidden width h of the router S (Eq. 11; the paper says 'an MLP' without its form): 0 = one bias-free "
                "Linear(d_in -> K), as in the authors' released code and Table 2's parameter shares; h > 0 = "
                "Linear(d_in -> h) with bias, router_activation, bias-free Linear(h -> K)."})
    router_activation: str = field(default="gelu", metadata={
        "help": "Activation of the router's hidden layer (used when router_hidden_size > 0): "
                f"one of {tuple(ROUTER_ACTIVATIONS)}."})

    def __post_init__(self) -> None:
        k = self.num_experts
        checks = self.adapter_checks("num_experts") + [
            (self.r_A is None or (isinstance(self.r_A, int) and self.r_A >= 1),
             f"r_A must be None or an integer >= 1, got {self.r_A!r}"),
            (self.interaction_init_range >= 0,
             f"interaction_init_range must be >= 0, got {self.interaction_init_range!r}"),
            (self.interaction_matrix in INTERACTION_MODES,
             f"interaction_matrix must be one of {INTERACTION_MODES}, got {self.interaction_matrix!r}"),
            (isinstance(self.share_A, bool), f"share_A must be true or false, got {self.share_A!r}"),
            (self.router_activation in ROUTER_ACTIVATIONS,
             f"router_activation must be one of {tuple(ROUTER_ACTIVATIONS)}, got {self.router_activation!r}"),
        ] + self.integer_checks(["router_hidden_size"], 0)
        self.validate(checks)
        if self.r_A is None:
            self.r_A = k * self.r
        elif self.r_A % k:
            raise ValueError(f"TeamLoraConfig: r_A={self.r_A} is not divisible by num_experts K={k}: "
                             "z = x A is split into K slices of equal width r_B = r_A / K")
        elif self.r_A != k * self.r:
            raise ValueError(f"TeamLoraConfig: r_A={self.r_A} is inconsistent with K * r_B = {k} * {self.r} = "
                             f"{k * self.r}; set r={self.r_A // k} or leave r_A unset")



def build_router(d_in: int, num_experts: int, hidden_size: int, activation: str, device) -> nn.Module:
    """S of Eq. 11, weights left uninitialised: a bias-free ``Linear(d_in -> K)`` when ``hidden_size = 0``,
    else ``Linear(d_in -> h)``, the activation, bias-free ``Linear(h -> K)``."""
    def linear(n_in, n_out, bias):
        return torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=bias, device=device, dtype=torch.float32)

    if hidden_size == 0:
        return linear(d_in, num_experts, False)
    return nn.Sequential(linear(d_in, hidden_size, True), ROUTER_ACTIVATIONS[activation](),
                         linear(hidden_size, num_experts, False))


class TeamLoraLinear(StackedLoraLinear):
    """y = W0 x + (alpha / r_B) * sum_i omega_i(x) h_i,  h_i = split(x A)_i B_i,  omega = M softmax(S x).

    ``lora_A`` is ``[d_in, K*r_B]`` (shared) or ``[K, d_in, r_B]`` (``share_A=False``: ``h_i = x A_i B_i``),
    ``lora_B`` is ``[K, r_B, d_out]`` (expert i is ``lora_B[i]``), the router S is built by ``build_router``
    and ``interaction`` is M ``[K, K]`` (a parameter without gradient when frozen, None when off: omega = phi).
    """

    def __init__(self, base_layer: nn.Module, num_experts: int, r_B: int, lora_alpha: float,
                 lora_dropout: float = 0.0, interaction_init_range: float = 0.1, interaction_matrix: str = "learned",
                 share_A: bool = True, router_hidden_size: int = 0, router_activation: str = "gelu") -> None:
        super().__init__(base_layer, num_experts, r_B, lora_alpha, lora_dropout, share_A)
        self.interaction_init_range, self.interaction_matrix = interaction_init_range, interaction_matrix
        self.router = build_router(self.d_in, num_experts, router_hidden_size, router_activation, self.device)
        if interaction_matrix == "off":
            self.register_parameter("interaction", None)
        else:
            self.interaction = nn.Parameter(torch.empty(num_experts, num_experts, device=self.device,
                                                        dtype=torch.float32),
                                            requires_grad=interaction_matrix == "learned")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A and every router weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's / nn.Linear's
        kaiming_uniform_(a=sqrt(5)); fan_in = d_in for A and each A_i); B_i = 0; M: off-diagonal ~ U(-a, a),
        diagonal 1. Drawn on the CPU: a seed gives the same weights on every device."""
        super().reset_parameters()                                    # shared A or one A_i per expert; B = 0
        for linear in (m for m in self.router.modules() if isinstance(m, nn.Linear)):
            uniform_fan_in_(linear.weight, linear.in_features)
            if linear.bias is not None:
                uniform_fan_in_(linear.bias, linear.in_features)
        if self.interaction is not None:
            a = self.interaction_init_range
            m = (torch.rand(self.interaction.shape, dtype=torch.float32) * 2 - 1) * a
            self.interaction.copy_(m.fill_diagonal_(1.0))

    def expert_weights(self, x: torch.Tensor) -> torch.Tensor:
        """omega = M phi, phi = softmax(S x), per token: ``[..., K]`` (Eq. 11-12); omega = phi without M."""
        phi = torch.softmax(self.router(x), dim=-1)
        return phi if self.interaction is None else phi @ self.interaction.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        x = x.to(self.lora_A.dtype)
        omega = self.expert_weights(x)
        z = self.adapter_outputs(self.dropout(x))                    # z_i = split(x A)_i, or x A_i without share_A
        return self.add_update(result, self.mixed_update(z, omega))  # sum_i omega_i z_i B_i

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_adapters}, r_B={self.r}, scaling={self.scaling:g}, share_A={self.share_A}, "
                f"interaction_matrix={self.interaction_matrix}")


class TeamLoraModel(LayerAdapterModel):
    """A frozen causal LM with a TeamLoraLinear on every target module. ``mergeable = False``: the expert
    weights omega depend on the token, so the experts cannot be folded into W0."""

    config_class = TeamLoraConfig
    state_name = "teamlora"
    mergeable = False

    def make_layer(self, layer: nn.Module) -> TeamLoraLinear:
        cfg = self.config
        return TeamLoraLinear(layer, cfg.num_experts, cfg.r, cfg.lora_alpha, cfg.lora_dropout,
                              cfg.interaction_init_range, cfg.interaction_matrix, cfg.share_A,
                              cfg.router_hidden_size, cfg.router_activation)

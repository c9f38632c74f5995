"""LoRATRF (docs/method.md): plain LoRA plus a task-aware filter on every decoder layer's output.

Reading of the paper ("Task-Aware Filters", Eq. 4-5 and footnote 1):

- placement: the filter acts on "the representation vector h^l in each Transformer layer l", and
  the refined information "is added to the original representation": here, on the output hidden
  state of every decoder layer (a forward hook on ``model.layers[l]`` for Llama, ``transformer.h[l]``
  for GPT-2 / Falcon, ``model.decoder.layers[l]`` for OPT, ...), before the next layer;
- h~_i = clamp(cos(h_i, t), 0, 1) * h_i per token, with a learnable task vector t (d). The text says
  the product with t is "clamped to [0, 1]" and Eq. 4 measures it by cosine similarity: the clamp of
  the cosine, so a token pointing away from t (cos <= 0) is left untouched;
- h^_i = h~_i T with T (d x d) approximated by two low-rank factors (footnote 1): T = T1 T2,
  T1 (d x filter_rank), T2 (filter_rank x d); h <- h + h^;
- initialisation (not given in the paper): T1 ~ U(-1/sqrt(d), 1/sqrt(d)) and T2 = 0, as LoRA's A and
  B, so the filter starts as the identity; t ~ N(0, I) (the cosine ignores its scale);
- LoRA on ``o_proj, gate_proj, up_proj, down_proj`` by default (the paper's W_o, W_f1, W_f2 for LLaMA);
  on other architectures the same roles under their names (``LORATRF_DEFAULT_TARGETS``), else an error.

Not mergeable: the filter's clamp(cos(h, t), 0, 1) weighting makes it a non-linear map of h.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from comlora.methods.adapter_config import AdapterConfig
from comlora.methods.base import LayerAdapterModel
from comlora.methods.lora_layer import LoraLinear, uniform_fan_in_

LORATRF_TARGET_MODULES = ["o_proj", "gate_proj", "up_proj", "down_proj"]
# The paper's W_o (attention output), W_f1 and W_f2 (MLP) under each naming, tried in order.
LORATRF_DEFAULT_TARGETS = (
    LORATRF_TARGET_MODULES,                         # Llama, Mistral, Qwen2/3, Gemma ...
    ["o_proj", "gate_up_proj", "down_proj"],        # Phi-3 (gate and up fused)
    ["dense", "dense_h_to_4h", "dense_4h_to_h"],    # GPT-NeoX, Falcon
    ["out_proj", "fc1", "fc2"],                     # OPT
    ["attn.c_proj", "c_fc", "mlp.c_proj"],          # GPT-2
)


@dataclass
class LoraTrfConfig(AdapterConfig):
    """Configuration of LoRATRF: rank-r LoRA on the target modules and a task-aware filter per decoder layer."""

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Linear / Conv1D modules to adapt: a list of name suffixes (PEFT style) or one regex matched "
                "against the full module name; None = the attention output and MLP layers (o_proj, gate_proj, "
                "up_proj, down_proj on Llama; the same roles on Phi-3, GPT-2, GPT-NeoX, OPT, Falcon), an error on "
                "other architectures."})
    filter_rank: int = field(default=8, metadata={
        "help": "Rank of the filter's transform T = T1 T2 (d x filter_rank x d)."})

    def __post_init__(self) -> None:
        self.validate(self.adapter_checks("filter_rank"))


class TaskFilter(nn.Module):
    """h <- h + (clamp(cos(h, t), 0, 1) * h) T1 T2, per token (Eq. 4-5); T2 = 0 at init: the identity."""

    def __init__(self, hidden_size: int, rank: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.task_vector = nn.Parameter(torch.empty(hidden_size, device=device, dtype=torch.float32))
        self.T1 = nn.Parameter(torch.empty(hidden_size, rank, device=device, dtype=torch.float32))
        self.T2 = nn.Parameter(torch.zeros(rank, hidden_size, device=device, dtype=torch.float32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """t ~ N(0, I); T1 ~ U(-1/sqrt(d), 1/sqrt(d)); T2 = 0. Drawn on the CPU (same weights on every device)."""
        self.task_vector.copy_(torch.randn(self.task_vector.shape, dtype=torch.float32))
        uniform_fan_in_(self.T1, self.T1.shape[0])
        self.T2.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.T1.dtype)
        relevance = F.cosine_similarity(x, self.task_vector, dim=-1).clamp(0.0, 1.0)   # [...]
        return h + ((relevance.unsqueeze(-1) * x) @ self.T1 @ self.T2).to(h.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.T1.shape[0]}, rank={self.T1.shape[1]}"


def filter_decoder_output(layer: nn.Module, args, output):
    """Forward hook of a decoder layer: its output hidden state (a tensor, or the first item of a tuple
    in older transformers) goes through ``layer.task_filter``."""
    if isinstance(output, tuple):
        return (layer.task_filter(output[0]), *output[1:])
    return layer.task_filter(output)


def decoder_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the causal LM's decoder layers: the first ``nn.ModuleList`` holding ``num_hidden_layers``
    modules (``model.layers`` on Llama, ``transformer.h`` on GPT-2 / Falcon, ``model.decoder.layers`` on OPT)."""
    config = getattr(model, "config", None)
    count = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and count and len(module) == count:
            return name, module
    raise ValueError(f"LoRATRF filters the output of every decoder layer, but {type(model).__name__} has no list of "
                     f"its num_hidden_layers={count} decoder layers")


class LoraTrfModel(LayerAdapterModel):
    """A frozen causal LM with a rank-r LoRA on every target module (``LoraLinear``)
    and a ``TaskFilter`` on the output of every decoder layer (``layers[l].task_filter``, applied by a
    forward hook). ``mergeable = False``: the filter is not a linear map of the hidden state."""

    config_class = LoraTrfConfig
    state_name = "loratrf"
    mergeable = False
    preferred_targets = LORATRF_DEFAULT_TARGETS
    use_peft_target_mapping = False

    def __init__(self, model: nn.Module, config: LoraTrfConfig) -> None:
        decoder_layer_list(model)           # a model without a list of decoder layers is refused before it changes
        super().__init__(model, config)

    def make_layer(self, layer: nn.Module) -> LoraLinear:
        return LoraLinear(layer, self.config.r, self.config.lora_alpha, self.config.lora_dropout)

    def add_modules(self) -> None:
        """A TaskFilter on every decoder layer's output."""
        layers_prefix, decoder_layers = decoder_layer_list(self.model)
        hidden_size = self.model.config.get_text_config().hidden_size   # not the embedding width (OPT may project)
        for i, decoder_layer in enumerate(decoder_layers):
            decoder_layer.task_filter = TaskFilter(hidden_size, self.config.filter_rank,
                                                   next(decoder_layer.parameters()).device)
            decoder_layer.register_forward_hook(filter_decoder_output)
            self.injected[f"{layers_prefix}.{i}.task_filter"] = decoder_layer.task_filter

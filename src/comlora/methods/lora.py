"""Plain LoRA and DoRA, trained through PEFT; the saved state is a standard PEFT adapter folder."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from transformers.pytorch_utils import Conv1D

from comlora.methods.adapter_config import AdapterConfig
from comlora.methods.base import AdapterModel, LoraWeight, seeded
from comlora.methods.injection import find_target_modules, resolve_target_modules
from comlora.methods.saved_state import load_peft_adapter
from comlora.peft_import import peft, peft_quietly
from comlora.quantization import is_quantized


@dataclass
class PeftLoraConfig(AdapterConfig):
    """PEFT's LoRA (or DoRA) on the target modules: W0 x + (lora_alpha / r) B A x."""

    use_dora: bool = field(default=False, metadata={"help": "DoRA: a learned magnitude per output row on top of the "
                                                            "LoRA direction update (PEFT's use_dora)."})

    def __post_init__(self) -> None:
        self.validate(self.adapter_checks())


class PeftLoraModel(AdapterModel):
    """PEFT's LoRA / DoRA on ``target_modules`` (None: the architecture's default, as for every method here;
    ``fan_in_fan_out`` set for GPT-2's Conv1D layers). ``peft_model`` is the PeftModel."""

    config_class = PeftLoraConfig
    state_name = "lora"
    mergeable = True

    def __init__(self, model: nn.Module, config: PeftLoraConfig, peft_model: peft.PeftModel | None = None) -> None:
        super().__init__(model, config)
        if peft_model is None:
            targets = resolve_target_modules(model, config.target_modules)
            conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n in find_target_modules(model, targets))
            lora = peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                   target_modules=targets, bias="none", task_type="CAUSAL_LM",
                                   use_dora=config.use_dora, fan_in_fan_out=conv1d)
            with seeded(config.seed), peft_quietly():
                peft_model = peft.get_peft_model(model, lora)
        self.peft_model = peft_model
        self.model = peft_model.base_model.model

    def forward(self, *args, **kwargs):
        return self.peft_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.peft_model.generate(*args, **kwargs)

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """{"adapter": PEFT's trainable tensors (lora_A, lora_B, DoRA's magnitude), "router": none}."""
        return {"adapter": {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}, "router": {}}

    def merge(self, component: int | None = None, inplace: bool = False) -> nn.Module:
        """PEFT's ``merge_and_unload``: W = W0 + (alpha / r) B A (DoRA: rescaled by its magnitude); ``inplace``
        consumes this model, otherwise a copy is merged."""
        self.resolve_component(component)
        if is_quantized(self.model):
            raise ValueError(f"merging a {self.state_name} run trained on a quantized base is not supported (PEFT "
                             "would re-quantize the merged weights); export the adapter and merge it with PEFT onto "
                             "the full-precision base")
        return (self.peft_model if inplace else copy.deepcopy(self.peft_model)).merge_and_unload()

    def lora_weights(self, component: int | None = None) -> list[LoraWeight]:
        """PEFT's lora_A [r, d_in] and lora_B [d_out, r] of every adapted layer, with the layer's own scale; DoRA
        has no such form (its magnitude vector rescales W0)."""
        self.resolve_component(component)
        name = self.peft_model.active_adapter
        if self.peft_model.peft_config[name].use_dora:
            raise ValueError("DoRA has no llama.cpp LoRA form (its magnitude vector rescales W0): export it merged "
                             "(comlora export RUN --merge --out DIR) and convert that with llama.cpp's "
                             "convert_hf_to_gguf.py")
        return [LoraWeight(module_name, module.get_base_layer().weight, module.lora_A[name].weight,
                           module.lora_B[name].weight, module.scaling[name])
                for module_name, module in self.model.named_modules()
                if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.lora_A]

    def save(self, path: str | Path) -> Path:
        """A PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``."""
        # no embedding-layer check: it would look the base model up on the Hub
        self.peft_model.save_pretrained(path, save_embedding_layers=False)
        return Path(path)

    @classmethod
    def load(cls, model: nn.Module, path: str | Path) -> PeftLoraModel:
        peft_model = load_peft_adapter(model, path, is_trainable=True)
        saved = peft_model.peft_config["default"]
        targets = saved.target_modules if isinstance(saved.target_modules, str) else sorted(saved.target_modules)
        config = PeftLoraConfig(r=saved.r, lora_alpha=saved.lora_alpha, lora_dropout=saved.lora_dropout,
                                target_modules=targets, use_dora=bool(saved.use_dora))
        return cls(model, config, peft_model)

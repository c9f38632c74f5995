"""One component out of a ComLoraModel: as a standard PEFT LoRA adapter, or merged into the base (docs/method.md)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from comlora.peft_import import peft
from comlora.quantization import merged_base
from comlora.storage import write_json, write_safetensors

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def peft_lora_config(cm) -> peft.LoraConfig:
    """The PEFT LoraConfig that places an r-rank adapter on exactly the modules ComLoRA adapted (named in
    full: a suffix or regex could also match modules that are not nn.Linear, which PEFT would adapt too);
    ``fan_in_fan_out`` when they are GPT-2 ``Conv1D`` layers (weight ``[d_in, d_out]``), as PEFT sets it."""
    cfg = cm.config
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=sorted(cm.adapted), bias="none", task_type="CAUSAL_LM",
                           fan_in_fan_out=any(layer.fan_in_fan_out for layer in cm.adapted.values()),
                           base_model_name_or_path=getattr(cm.model, "name_or_path", None) or None)


def peft_adapter_state(cm, component: int) -> dict[str, torch.Tensor]:
    """PEFT's key names: base_model.model.<module>.lora_A.weight = A_k^T [r, d_in], lora_B.weight = B_k^T [d_out, r]."""
    state = {}
    for name, layer in cm.adapted.items():
        state[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[component].T
        state[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[component].T
    return state


def write_peft_adapter(cm, component: int, path: str | Path) -> Path:
    """``adapter_model.safetensors`` + ``adapter_config.json``, loadable by ``peft.PeftModel.from_pretrained``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / PEFT_WEIGHTS, peft_adapter_state(cm, component),
                      metadata={"comlora_component": str(component)})
    config = peft_lora_config(cm).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()} | {"inference_mode": True}
    write_json(path / PEFT_CONFIG, config)
    return path


@torch.no_grad()
def merge_component(cm, component: int, inplace: bool) -> nn.Module:
    """Replace every ComLoraLinear by its base layer with W <- W0 + (alpha/r) (A_k B_k)^T (nn.Linear) or
    W <- W0 + (alpha/r) A_k B_k (Conv1D, weight [d_in, d_out])."""
    model = cm.model
    if not inplace:
        with cm.disable_adapters():
            model = copy.deepcopy(cm.model)
    model = merged_base(model)          # a 4-bit / 8-bit base is dequantized first, with a note
    names = list(cm.adapted)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        base = layer.base_layer
        base.weight += layer.delta_weight(component).to(base.weight.dtype)
        setattr(parent, child, base)
    if inplace:
        cm.injected.clear()
        cm.selector = None
    return model

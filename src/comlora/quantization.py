"""Quantized frozen bases (QLoRA): bitsandbytes 4-bit (nf4) and 8-bit layers through transformers.

The adapters (ComLoRA's K components, LoRA, the related methods' experts) stay float32 and add their update
to the output of the quantized layer's own forward, ``W0 x`` computed by bitsandbytes. Merging a component
into such a base dequantizes it first (``merged_base``): the merged model is a full-precision model.
"""

from __future__ import annotations

import importlib.util
import sys

import torch
from torch import nn


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("a 4-bit or 8-bit base needs bitsandbytes: pip install 'comlora[qlora]' "
                          "(bitsandbytes==0.50.2; it runs 4-bit layers on CPUs too)")


def bnb_quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig``: 4-bit nf4 with double quantization and ``compute_dtype``, or LLM.int8;
    None when neither is asked for."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of load_in_4bit and load_in_8bit")
    if not (load_in_4bit or load_in_8bit):
        return None
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def use_exact_4bit_forward(model: nn.Module) -> nn.Module:
    """Keep every bitsandbytes 4-bit layer of ``model`` on y = x dequant(W0)^T in its compute dtype, in training and
    in evaluation alike; returns ``model``.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weight the first time it runs in eval mode
    without gradients and from then on computes in bfloat16 (its ``support_avx512bf16_for_cpu`` path): evaluation
    then differs from what training computed (0.4% relative on a SmolLM2 q_proj), a deep copy of the model reports
    bfloat16, and layers narrower than the quantization block (64 inputs) fail to repack. Switching the path off
    makes every CPU compute what this one does; a layer already repacked is unpacked first.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse   # what bnb's own save uses

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return model


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` was loaded with a bitsandbytes quantization config (and not dequantized since)."""
    return bool(getattr(model, "is_quantized", False)) and getattr(model, "hf_quantizer", None) is not None \
        and (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def merged_base(model: nn.Module) -> nn.Module:
    """``model`` with every quantized linear layer replaced by a full-precision ``nn.Linear`` holding dequant(W0)
    in the dtype of its other layers (transformers' ``dequantize``; PEFT's merge dequantizes too before adding the
    update), with a note saying so. A model that is not quantized is returned unchanged."""
    if not is_quantized(model):
        return model
    bits = 4 if getattr(model, "is_loaded_in_4bit", False) else 8
    print(f"note: the base is quantized ({bits}-bit, bitsandbytes); merging dequantizes it: the merged model is a "
          f"full-precision {model.config.dtype} model with W = dequant(W0) + (alpha/r) (A_k B_k)^T", file=sys.stderr)
    return model.dequantize()

"""Quantized frozen bases (QLoRA): bitsandbytes 4-bit (nf4) and 8-bit layers through transformers.

The adapters (ComLoRA's K components, LoRA, the related methods' experts) stay float32 and add their update
to the output of the quantized layer's own forward, ``W0 x`` computed by bitsandbytes. Merging a component
into such a base dequantizes it first (``merged_base``): the merged model is a full-precision model.

bitsandbytes' 4-bit layer has two CPU paths. Training (and any forward with a gradient) dequantizes W0 and
multiplies in the compute dtype: y = x dequant(W0)^T. On a CPU with AVX512-BF16, its first inference forward
(eval mode, no gradient) instead repacks the weight into a CPU layout with bfloat16 block scales and from then on
computes in bfloat16, another function than the one trained; and ``dequantize`` misreads that layout, so a
merge after such a forward is a wrong model. ``use_exact_4bit_forward`` keeps every 4-bit layer on the first
path (``load_model_and_tokenizer`` and every method apply it).
"""

from __future__ import annotations

import copy
import importlib.metadata
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


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` was loaded with a bitsandbytes quantization config (and not dequantized since)."""
    return bool(getattr(model, "is_quantized", False)) and getattr(model, "hf_quantizer", None) is not None \
        and (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


# the BitsAndBytesConfig fields that decide the quantized weights and how their layers compute
RECORDED_FIELDS = {4: ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
                       "bnb_4bit_quant_storage"),
                   8: ("load_in_8bit", "llm_int8_threshold")}


def quantization_record(model: nn.Module) -> dict | None:
    """How a quantized ``model`` was quantized, for model cards and winner.json: ``{"bits", "library",
    "BitsAndBytesConfig": {field: value}}``; None for a model that is not quantized."""
    if not is_quantized(model):
        return None
    config = model.config.quantization_config
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    bits = 4 if values.get("load_in_4bit") else 8
    return {"bits": bits, "library": f"bitsandbytes=={importlib.metadata.version('bitsandbytes')}",
            "BitsAndBytesConfig": {name: values[name] for name in RECORDED_FIELDS[bits] if name in values}}


def weight_count(parameter: torch.Tensor) -> int:
    """The number of weights a parameter holds: ``numel()``, except for a bitsandbytes 4-bit weight, which stores two
    4-bit codes per byte (its numel() is half its count) and keeps its logical shape in ``quant_state.shape``."""
    shape = getattr(getattr(parameter, "quant_state", None), "shape", None)
    return shape.numel() if shape is not None else parameter.numel()


def is_cpu_repacked(layer: nn.Module) -> bool:
    """True when a bitsandbytes 4-bit layer's weight is in the AVX512-BF16 CPU layout (``packing_format_for_cpu``)."""
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def restore_4bit_layout(layer: nn.Module) -> None:
    """Put a CPU-repacked 4-bit weight back in bitsandbytes' standard layout: the same 4-bit codes, one float32 scale
    per block equal to the bfloat16 scale the repacked weight holds (bitsandbytes' own inverse re-quantizes the
    scales a second time, so it is used for the codes only)."""
    from bitsandbytes.functional import QuantState, _convert_weight_packed_for_cpu_inverse

    packed = layer.weight.quant_state
    codes_only = copy.copy(packed)
    codes_only.original_nested = False
    codes, _ = _convert_weight_packed_for_cpu_inverse(layer.weight.data, codes_only)
    # the repacking stored the scales as absmax.reshape(N, K / blocksize).T in bfloat16
    state = QuantState(absmax=packed.absmax.T.reshape(-1).float(), shape=packed.shape, code=packed.code,
                       blocksize=packed.blocksize, quant_type=packed.quant_type, dtype=packed.original_dtype)
    state.packing_format_for_cpu = False
    layer.weight.data, layer.weight.quant_state = codes, state
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = state


def use_exact_4bit_forward(model: nn.Module) -> nn.Module:
    """Keep every bitsandbytes 4-bit layer of ``model`` on y = x dequant(W0)^T in its compute dtype, in training and
    in evaluation alike, and put back any weight already repacked for the AVX512-BF16 CPU path (module docstring;
    issue 25: 0.4% relative on a SmolLM2 q_proj, a merge after an evaluation off by up to 41 in the logits, layers
    narrower than 64 inputs failing to repack); returns ``model``. A model without 4-bit layers is unchanged."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):        # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False
            if is_cpu_repacked(module):
                restore_4bit_layout(module)
    return model


def merged_base(model: nn.Module) -> nn.Module:
    """``model`` with every quantized linear layer replaced by a full-precision ``nn.Linear`` holding dequant(W0)
    in the dtype of its other layers (transformers' ``dequantize``; PEFT's merge dequantizes too before adding the
    update), with a note saying so. A model that is not quantized is returned unchanged."""
    if not is_quantized(model):
        return model
    bits = 4 if getattr(model, "is_loaded_in_4bit", False) else 8
    compute = next((m.compute_dtype for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")), None)
    rounding = (f"which compute x dequant(W0)^T in {compute or 'the input dtype'}" if bits == 4 else
                "LLM.int8 also rounds the inputs to 8 bits")
    print(f"note: the base is quantized ({bits}-bit, bitsandbytes); merging dequantizes it: the merged model is a "
          f"full-precision {model.config.dtype} model with W = dequant(W0) + (alpha/r) (A_k B_k)^T. It differs from "
          f"the {bits}-bit model by the {bits}-bit layers' own rounding ({rounding}; on SmolLM2-135M, 4-bit, float32: "
          f"logits within 1e-4 of each other, docs/scale.md)", file=sys.stderr)
    return use_exact_4bit_forward(model).dequantize()

"""How far a merged 4-bit run is from the 4-bit model it was trained as, on SmolLM2-135M (issue 25, item 4).

1. One q_proj: bitsandbytes' 4-bit forward against x dequant(W0)^T computed in float64, on the real input of that
   layer for a few validation prompts (relative error ||y - y_ref|| / ||y_ref|| and the largest one per element).
   Beside it, for comparison with CPUs that have AVX512-BF16 (whose inference path repacks the weight and computes
   in bfloat16, see comlora/quantization.py; comlora keeps the dequantize path), the same product with x and
   dequant(W0) rounded to bfloat16 and float32 accumulation: an emulation, not bitsandbytes' kernel.
2. The whole model: ComLoRA K=2 on the 4-bit base with random B (so the adapter changes the logits), component 1
   as the 4-bit model computes it against ``cm.merge(1)`` (the float32 merged copy), on the same prompts; beside it
   the adapter's own effect (component 1 against the base alone) and the float32 base weights with the same
   adapter, which a card that said "the float32 weights" would have people use.

    python bench/quant_merge_gap.py [--items 8] [--b-std 0.02]
"""

import argparse
import os
import platform

import torch

from comlora import ComLoraConfig, ComLoraModel
from comlora.base_models import load_model_and_tokenizer
from comlora.data.items import collate
from comlora.methods.base import seeded
from comlora.training.config import TrainConfig
from comlora.training.data import load_training_data


def relative_errors(y: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(||y - ref|| / ||ref||, max |y - ref| / max |ref|) over real (attended) positions."""
    diff = (y.double() - reference).flatten()
    return float(diff.norm() / reference.norm()), float(diff.abs().max() / reference.abs().max())


def logit_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> str:
    keep = mask.bool()
    a, b = a[keep], b[keep]
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return (f"max |diff| {float((a - b).abs().max()):.3g} (largest |logit| {float(b.abs().max()):.3g}), "
            f"argmax agrees at {100 * agree:.1f}% of {len(a)} positions")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--items", type=int, default=8, help="validation prompts (commonsense-mini)")
    parser.add_argument("--b-std", type=float, default=0.02, help="std of the random B of the adapter")
    args = parser.parse_args()
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, has_avx512bf16

    cfg = TrainConfig(model=args.model, val_size=args.items, device="cpu", dtype="float32")
    model, tokenizer = load_model_and_tokenizer(cfg.model, device="cpu", dtype="float32", load_in_4bit=True)
    _, examples = load_training_data(cfg, tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    print(f"model {args.model}, 4-bit nf4 (double quant, compute dtype float32), bitsandbytes {bnb.__version__}; "
          f"{len(examples)} validation prompts, {int(mask.sum())} tokens")
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, AVX512-BF16 "
          f"{'yes' if has_avx512bf16() else 'no'}, torch {torch.__version__}")

    cm = ComLoraModel(model, ComLoraConfig(num_components=2, r=8, lora_alpha=16, seed=0))
    cm.eval()
    name = "model.layers.0.self_attn.q_proj"
    layer = cm.adapted[name].base_layer
    captured = {}
    hook = layer.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0].detach(), y=out.detach()))
    with torch.no_grad(), cm.disable_adapters():
        base_logits = cm.model(input_ids=ids, attention_mask=mask).logits
    hook.remove()
    x, y = captured["x"][mask.bool()], captured["y"][mask.bool()]
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    reference = x.double() @ weight.double().T
    norm_err, max_err = relative_errors(y, reference)
    print(f"1. {name} [{weight.shape[0]} x {weight.shape[1]}]: bitsandbytes' 4-bit forward vs x dequant(W0)^T "
          f"(float64): relative error {norm_err:.2e} (norm), {max_err:.2e} (largest element / largest output)")
    emulated = (x.bfloat16().float() @ weight.bfloat16().float().T)
    norm_err, max_err = relative_errors(emulated, reference)
    print(f"   bfloat16 emulation (x and dequant(W0) rounded to bfloat16, float32 sums): {norm_err:.2e} (norm), "
          f"{max_err:.2e} (largest)")

    with seeded(1), torch.no_grad():
        for adapted in cm.adapted.values():
            adapted.lora_B.normal_(std=args.b_std)
    with torch.no_grad(), cm.use_component(1):
        four_bit = cm(input_ids=ids, attention_mask=mask).logits
    merged = cm.merge(1)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, attention_mask=mask).logits
    print(f"2. merged (float32, W = dequant(W0) + update) vs the 4-bit model with component 1: "
          f"{logit_gap(merged_logits, four_bit, mask)}")
    print(f"   the adapter's own effect (4-bit base + component 1 vs 4-bit base): "
          f"{logit_gap(four_bit, base_logits, mask)}")
    del merged
    full, _ = load_model_and_tokenizer(cfg.model, device="cpu", dtype="float32")
    full_cm = ComLoraModel(full, ComLoraConfig(num_components=2, r=8, lora_alpha=16, seed=0))
    with torch.no_grad():
        for adapted_name, adapted in full_cm.adapted.items():
            adapted.lora_A.copy_(cm.adapted[adapted_name].lora_A)
            adapted.lora_B.copy_(cm.adapted[adapted_name].lora_B)
    full_cm.eval()
    with torch.no_grad(), full_cm.use_component(1):
        full_logits = full_cm(input_ids=ids, attention_mask=mask).logits
    print(f"   the same adapter on the float32 base weights vs the 4-bit model it was trained with: "
          f"{logit_gap(full_logits, four_bit, mask)}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

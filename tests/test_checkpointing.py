"""Activation checkpointing: the same per-sample losses and gradients as without it, for every method."""

import pytest
import torch
from conftest import (
    make_batch,
    make_loratrf_config,
    make_moelora_config,
    make_teamlora_config,
    make_tiny_llama,
    randomise_lora_B,
)

from comlora import ComLoraConfig, ComLoraModel
from comlora.methods.lora import PeftLoraConfig, PeftLoraModel
from comlora.methods.loratrf import LoraTrfModel
from comlora.methods.moelora import MoeLoraModel
from comlora.methods.teamlora import TeamLoraModel


def comlora_config(**overrides):
    values = dict(num_components=2, r=4, lora_alpha=8, top_n=2, selector_heads=4, selector_ffn_dim=32,
                  selector_dropout=0.0, noise_alpha=0.1, seed=3)
    return ComLoraConfig(**{**values, **overrides})


def build(method: str, checkpointing: bool):
    """The method model with non-zero B, built identically each time, in train mode (checkpointing needs it)."""
    base = make_tiny_llama(seed=0).train()
    if method.startswith("comlora"):
        extra = {"competition": "low_memory"} if method == "comlora-low-memory" else {"lora_dropout": 0.2}
        model = ComLoraModel(base, comlora_config(**extra))
        layers = list(model.adapted.values())
    elif method == "lora":              # PEFT's LoRA (the lora / dora methods)
        model = PeftLoraModel(base, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.2,
                                                   target_modules=["q_proj", "v_proj"], seed=3))
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():           # B = 0 at init makes LoRA a no-op
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        layers = []
    else:
        cls, config = {"moelora": (MoeLoraModel, make_moelora_config(lora_dropout=0.2)),
                       "teamlora": (TeamLoraModel, make_teamlora_config(lora_dropout=0.2)),
                       "loratrf": (LoraTrfModel, make_loratrf_config(lora_dropout=0.2))}[method]
        model = cls(base, config)
        layers = list(model.injected.values())
    randomise_lora_B(layers)
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def step(method: str, checkpointing: bool):
    """Per-sample losses (or the loss), the gradient of every trainable tensor, and how often layer 0's MLP ran."""
    model = build(method, checkpointing)
    calls = []
    model.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))   # inside the checkpoint
    batch = make_batch(batch_size=4, length=10)
    torch.manual_seed(7)                        # the same dropout masks and noise in both runs
    if method.startswith("comlora"):
        out = model.competition_step(**batch, step=2, total_steps=10)
        loss, per_sample = out.loss, out.per_sample_loss
    else:
        loss, _ = model.training_loss(**batch, step=2, total_steps=10)
        per_sample = loss.detach().reshape(1)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n), "every A gets a gradient"
    return per_sample, grads, len(calls)


# differentiated forward passes per step: one, except low_memory's K = 2 (its first pass runs without a graph)
@pytest.mark.parametrize("method, recomputed", [("comlora", 1), ("comlora-low-memory", 2), ("moelora", 1),
                                                ("teamlora", 1), ("loratrf", 1), ("lora", 1)])
def test_checkpointing_gives_the_same_losses_and_gradients(method, recomputed):
    plain_losses, plain_grads, plain_calls = step(method, checkpointing=False)
    ckpt_losses, ckpt_grads, ckpt_calls = step(method, checkpointing=True)
    assert ckpt_calls == plain_calls + recomputed        # the layer really was recomputed in the backward pass
    assert torch.allclose(plain_losses, ckpt_losses, atol=1e-5, rtol=0)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], ckpt_grads[name], atol=1e-5, rtol=0), name


def test_checkpointing_recomputes_in_the_mode_of_the_forward_pass():
    """The batched competition's backward runs after competition_step has left competition mode: without the
    recomputation context the K slices would be recomputed without their components (and the shapes differ)."""
    model = build("comlora", checkpointing=True)
    batch = make_batch()
    out = model.competition_step(**batch, step=0, total_steps=10)
    layer = next(iter(model.adapted.values()))
    assert not layer.competition and layer.active_component is None      # the step restored the default mode
    out.loss.backward()
    assert not layer.competition and layer.active_component is None


def test_reentrant_checkpointing_is_refused_with_a_reason():
    model = ComLoraModel(make_tiny_llama(), comlora_config())
    with pytest.raises(ValueError, match="non-reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_train_config_flag_turns_it_on(tmp_path, tiny_model_dir, commonsense_root):
    from comlora.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(["train", "--gradient-checkpointing", "--model", str(tiny_model_dir)])
    assert train_config_from_args(args).gradient_checkpointing is True

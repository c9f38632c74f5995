"""Files an earlier comlora wrote load into this version with the same values: the saved state and a checkpoint
of every method, written before the method packages (tests/fixtures/legacy-839705a, its README says how)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from comlora.methods.registry import build_method, load_method
from comlora.training.checkpoints import load_checkpoint
from comlora.training.config import TrainConfig

LEGACY = Path(__file__).parent / "fixtures" / "legacy-839705a"
METHODS = ["comlora", "lora", "dora", "moelora", "teamlora", "loratrf"]


def tiny_base() -> LlamaForCausalLM:
    """The fixtures' architecture (its weights do not matter: only the adapters' are saved)."""
    return LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def train_config(method: str) -> TrainConfig:
    options = {"selector_heads": 2, "selector_ffn_dim": 8} if method == "comlora" else {}
    return TrainConfig(method=method, model="x", data="x", num_components=2, r=2, method_options=options)


def as_then(expected: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
    """An expected tensor in this version's shape: LoRATRF's A and B (and their moments) had a leading axis of 1."""
    if expected.shape != now.shape:
        assert expected.shape == (1, *now.shape), (expected.shape, now.shape)
        return expected[0]
    return expected


@pytest.mark.parametrize("method", METHODS)
def test_a_state_saved_before_the_method_packages_loads_with_its_values(method):
    expected = load_file(str(LEGACY / method / "expected.safetensors"))
    params = [p for p in load_method(train_config(method), tiny_base(), LEGACY / method / "state").parameters()
              if p.requires_grad]
    assert len(params) == len([k for k in expected if k.endswith(".param")])
    for i, p in enumerate(params):
        assert torch.equal(p, as_then(expected[f"{i:03d}.param"], p)), (method, i)
    if method == "loratrf":
        assert any(expected[f"{i:03d}.param"].dim() == p.dim() + 1 for i, p in enumerate(params))  # a real reshape


@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_written_before_the_method_packages_resumes_with_its_values_and_moments(method):
    expected = load_file(str(LEGACY / method / "expected.safetensors"))
    model = build_method(train_config(method), tiny_base())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert load_checkpoint(LEGACY / method / "run" / "checkpoints" / "step-00000001", model, optimizer, scheduler) == 1
    for i, p in enumerate(params):
        assert torch.equal(p, as_then(expected[f"{i:03d}.param"], p)), (method, i)
        for moment in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[p][moment]
            assert state.shape == p.shape and torch.equal(state, as_then(expected[f"{i:03d}.{moment}"], p))
    sum(((i + 1) * p.float() ** 2).sum() for i, p in enumerate(params)).backward()
    optimizer.step()                     # the next step runs on the restored moments
    assert all(optimizer.state[p]["step"].item() == 2 for p in params)

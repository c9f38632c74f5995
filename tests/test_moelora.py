"""MoELoRA: routing and load-balancing math against float64 loops, bad configs. The behaviour it shares with
TeamLoRA and LoRATRF (pass-through, training, save/load, counts) is in test_related_methods.py."""

import math

import pytest
import torch
from torch import nn

from comlora.moelora import MoeLoraLinear, get_moelora_model, load_balancing_loss

from conftest import RELATED_TARGETS as TARGETS
from conftest import make_batch, make_tiny_llama, randomise_lora_B
from conftest import make_moelora_config as make_config


def reference_moe_layer(layer, x, top_k):
    """Explicit loops in float64: softmax router, optional top-k renormalised, sum_k g_k B_k^T A_k^T x."""
    W0, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    A, B, Wg = layer.lora_A.detach().double(), layer.lora_B.detach().double(), layer.router.weight.detach().double()
    K, d_in, r = A.shape
    d_out = B.shape[2]
    out, all_gates = torch.zeros(x.shape[0], d_out, dtype=torch.float64), []
    for n in range(x.shape[0]):
        xn = x[n].double()
        scores = [sum(Wg[k, i] * xn[i] for i in range(d_in)) for k in range(K)]
        exps = [math.exp(float(s)) for s in scores]
        probs = [e / sum(exps) for e in exps]
        kept = sorted(range(K), key=lambda k: -probs[k])[: (top_k or K)]
        gates = [probs[k] / sum(probs[j] for j in kept) if k in kept else 0.0 for k in range(K)]
        all_gates.append(gates)
        for o in range(d_out):
            y = sum(W0[o, i] * xn[i] for i in range(d_in)) + b[o]
            for k in range(K):
                for j in range(r):
                    z = sum(xn[i] * A[k, i, j] for i in range(d_in))
                    y += layer.scaling * gates[k] * z * B[k, j, o]
            out[n, o] = y
    return out, torch.tensor(all_gates, dtype=torch.float64)


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_layer_matches_float64_loops_and_routes_top_k(top_k):
    torch.manual_seed(0)
    layer = MoeLoraLinear(nn.Linear(5, 4), num_experts=3, r=2, lora_alpha=6, top_k=top_k)
    randomise_lora_B([layer])
    x = torch.randn(6, 5)
    expected, expected_gates = reference_moe_layer(layer, x, top_k)
    with torch.no_grad():
        out = layer(x)
        probs, gates = layer.route(x)
    assert (out.double() - expected).abs().max() < 1e-5
    assert (gates.double() - expected_gates).abs().max() < 1e-6
    assert torch.allclose(gates.sum(-1), torch.ones(6)) and torch.allclose(probs.sum(-1), torch.ones(6))
    assert ((gates > 0).sum(-1) == (top_k or 3)).all()


def test_layer_routes_per_token_on_any_leading_shape():
    torch.manual_seed(0)
    layer = MoeLoraLinear(nn.Linear(5, 4), num_experts=3, r=2, lora_alpha=6, top_k=2)
    randomise_lora_B([layer])
    x = torch.randn(2, 3, 5)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer(x.reshape(6, 5)).reshape(2, 3, 4), atol=1e-6)


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    # top-1 experts 0, 0, 1, 2 -> f = [1/2, 1/4, 1/4]; P = column means = [0.4, 0.375, 0.225]
    expected = 3 * (0.5 * 0.4 + 0.25 * 0.375 + 0.25 * 0.225)
    assert abs(float(load_balancing_loss(probs)) - expected) < 1e-6
    assert abs(float(load_balancing_loss(torch.full((4, 3), 1 / 3))) - 1.0) < 1e-6
    assert abs(float(load_balancing_loss(torch.tensor([[1.0, 0.0, 0.0]] * 4))) - 3.0) < 1e-6


def test_training_loss_balance_is_the_layer_mean_over_real_tokens():
    batch = make_batch()
    mm = get_moelora_model(make_tiny_llama(), make_config(load_balance_weight=0.5))
    inputs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: inputs.append((mod, args[0].detach())))
             for layer in mm.injected.values()]
    loss, parts = mm.training_loss(**batch, step=0, total_steps=1)
    for h in hooks:
        h.remove()
    real = batch["attention_mask"].bool()
    per_layer = []
    for layer, x in inputs:
        probs = layer.route(x.float())[0].detach()[real]
        top1 = probs.argmax(-1)
        f = torch.tensor([(top1 == k).float().mean() for k in range(3)])
        per_layer.append(3 * float((f * probs.mean(0)).sum()))
    assert len(per_layer) == len(mm.injected) == 2 * len(TARGETS)
    assert abs(parts["balance"] - sum(per_layer) / len(per_layer)) < 1e-5
    assert abs(parts["loss"] - (parts["lm"] + 0.5 * parts["balance"])) < 1e-5
    assert abs(float(loss.detach()) - parts["loss"]) < 1e-6
    assert all(layer.router_probs is None and not layer.record_router for layer in mm.injected.values())


@pytest.mark.parametrize("overrides, message", [
    (dict(num_experts=0), "num_experts"),
    (dict(r=0), "r must be"),
    (dict(top_k=4), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(load_balance_weight=-1.0), "load_balance_weight"),
    (dict(lora_dropout=1.0), "lora_dropout"),
])
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)

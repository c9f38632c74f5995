"""MoELoRA: routing, load-balancing and the contrastive loss among experts against float64 loops, bad configs.
The behaviour it shares with
TeamLoRA and LoRATRF (pass-through, training, save/load, counts) is in test_related_methods.py."""

import math

import pytest
import torch
from conftest import RELATED_TARGETS as TARGETS
from conftest import make_batch, make_tiny_llama, randomise_lora_B
from conftest import make_moelora_config as make_config
from torch import nn

from comlora.methods.moelora import MoeLoraLinear, MoeLoraModel, expert_contrastive_loss, load_balancing_loss
from comlora.methods.registry import method_config
from comlora.training.config import TrainConfig


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
    mm = MoeLoraModel(make_tiny_llama(), make_config(load_balance_weight=0.5))
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
    (dict(contrastive_loss="yes"), "contrastive_loss must be true or false"),
    (dict(contrastive_weight=-0.1), "contrastive_weight must be >= 0"),
    (dict(contrastive_temperature=0.0), "contrastive_temperature must be > 0"),
    (dict(contrastive_tokens=1), "contrastive_tokens must be an integer >= 2, got 1"),
    (dict(contrastive_loss=True, num_experts=1, top_k=None),
     "contrastive_loss contrasts different experts: it needs num_experts >= 2"),
])
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def reference_contrastive_loss(vectors, labels, tau):
    """Explicit loops in float64: for every anchor a whose expert has another output, the mean over its
    positives p (same expert) of -log(exp(cos(a, p)/tau) / sum_{b != a} exp(cos(a, b)/tau)); mean over anchors."""
    def cos(u, v):
        dot = sum(ui * vi for ui, vi in zip(u, v))
        return dot / (math.sqrt(sum(ui * ui for ui in u)) * math.sqrt(sum(vi * vi for vi in v)))

    n, per_anchor = len(vectors), []
    for a in range(n):
        positives = [p for p in range(n) if p != a and labels[p] == labels[a]]
        if not positives:
            continue
        denominator = sum(math.exp(cos(vectors[a], vectors[b]) / tau) for b in range(n) if b != a)
        terms = [-math.log(math.exp(cos(vectors[a], vectors[p]) / tau) / denominator) for p in positives]
        per_anchor.append(sum(terms) / len(terms))
    return sum(per_anchor) / len(per_anchor)


def test_expert_contrastive_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(7, 3, generator=g, dtype=torch.float64)
    experts = torch.tensor([0, 1, 0, 2, 1, 0, 3])        # expert 3 has one output: a negative, never an anchor
    for tau in (0.07, 0.5, 2.0):
        expected = reference_contrastive_loss(outputs.tolist(), experts.tolist(), tau)
        got = expert_contrastive_loss(outputs, experts, tau)
        assert got.dtype == torch.float64 and abs(float(got) - expected) < 1e-10
    # scaling an output leaves it unchanged (cosine similarity): the gates g_k > 0 do not matter
    scaled = outputs * torch.tensor([3.0, 0.5, 1.0, 7.0, 2.0, 1.0, 0.1], dtype=torch.float64).unsqueeze(1)
    assert abs(float(expert_contrastive_loss(scaled, experts, 0.5))
               - float(expert_contrastive_loss(outputs, experts, 0.5))) < 1e-12
    # outputs of distinct experts pulled apart give a lower loss than the same outputs mixed across experts
    apart = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    assert float(expert_contrastive_loss(apart, torch.tensor([0, 0, 1, 1]), 0.5)) < \
        float(expert_contrastive_loss(apart, torch.tensor([0, 1, 0, 1]), 0.5))
    # no output with a positive: 0, and still differentiable
    lone = torch.randn(3, 4, requires_grad=True)
    zero = expert_contrastive_loss(lone, torch.tensor([0, 1, 2]), 0.1)
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.equal(lone.grad, torch.zeros(3, 4))


def captured_inputs(mm):
    """Forward hooks that record every MoeLoraLinear's input x (detached), in call order."""
    inputs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: inputs.append((mod, args[0].detach())))
             for layer in mm.injected.values()]
    return inputs, hooks


@pytest.mark.parametrize("top_k", [None, 2])
def test_contrastive_part_is_the_layer_mean_over_routed_expert_outputs_by_hand(top_k):
    batch = make_batch()
    cfg = make_config(top_k=top_k, load_balance_weight=0.5, contrastive_loss=True, contrastive_weight=0.3,
                      contrastive_temperature=0.5, contrastive_tokens=100)     # > the 25 real tokens: no sampling
    mm = MoeLoraModel(make_tiny_llama(), cfg)
    randomise_lora_B(mm.injected.values())
    inputs, hooks = captured_inputs(mm)
    loss, parts = mm.training_loss(**batch, step=0, total_steps=1)
    for h in hooks:
        h.remove()
    real = batch["attention_mask"].flatten().bool()
    per_layer = []
    for layer, x in inputs:
        x = x.double().flatten(0, -2)[real]                                   # [T, d_in] real tokens
        A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        probs = torch.softmax(x @ layer.router.weight.detach().double().T, -1)
        kept = probs.topk(top_k or 3, dim=-1).indices
        vectors, labels = [], []
        for n in range(x.shape[0]):
            for k in sorted(kept[n].tolist()):
                vectors.append((layer.scaling * (x[n] @ A[k]) @ B[k]).tolist())   # (alpha/r) B_k^T A_k^T x_n
                labels.append(k)
        assert len(vectors) == int(real.sum()) * (top_k or 3)
        per_layer.append(reference_contrastive_loss(vectors, labels, 0.5))
    assert len(per_layer) == len(mm.injected) == 2 * len(TARGETS)
    assert abs(parts["contrastive"] - sum(per_layer) / len(per_layer)) < 1e-5
    assert abs(parts["loss"] - (parts["lm"] + 0.5 * parts["balance"] + 0.3 * parts["contrastive"])) < 1e-5
    assert abs(float(loss.detach()) - parts["loss"]) < 1e-6
    assert all(layer.contrastive_rows is None and layer.expert_outputs is None for layer in mm.injected.values())


def test_zero_contrastive_weight_trains_exactly_as_the_loss_off():
    """Weight 0: the part is logged, the loss and every gradient are those of contrastive_loss=False, and the
    token sample (drawn from its own generator) leaves the global RNG, hence dropout, alone."""
    batch = make_batch()
    results = {}
    for on in (False, True):
        mm = MoeLoraModel(make_tiny_llama(), make_config(contrastive_loss=on, contrastive_weight=0.0,
                                                               contrastive_tokens=4, lora_dropout=0.1))
        randomise_lora_B(mm.injected.values())
        mm.train()
        torch.manual_seed(123)
        loss, parts = mm.training_loss(**batch, step=3, total_steps=5)
        loss.backward()
        rng_after = torch.get_rng_state()
        results[on] = (loss.detach(), parts, {n: p.grad for n, p in mm.named_parameters() if p.requires_grad},
                       rng_after)
    (loss_off, parts_off, grads_off, rng_off), (loss_on, parts_on, grads_on, rng_on) = results[False], results[True]
    assert "contrastive" not in parts_off and parts_on["contrastive"] > 0
    assert torch.equal(loss_off, loss_on) and torch.equal(rng_off, rng_on)
    assert grads_off.keys() == grads_on.keys() and all(torch.equal(grads_off[n], grads_on[n]) for n in grads_off)


def test_contrastive_tokens_are_a_seeded_sample_of_the_real_tokens():
    batch = make_batch()
    mm = MoeLoraModel(make_tiny_llama(), make_config(contrastive_loss=True, contrastive_tokens=5))
    mask = batch["attention_mask"]
    real = set(mask.flatten().nonzero().squeeze(1).tolist())
    rows = mm.contrastive_sample(mask, step=7)
    assert len(rows) == 5 and len(set(rows.tolist())) == 5 and set(rows.tolist()) <= real
    assert torch.equal(rows, mm.contrastive_sample(mask, step=7))                 # a resumed run draws the same
    assert any(not torch.equal(rows, mm.contrastive_sample(mask, step=s)) for s in range(8, 12))
    assert len(mm.contrastive_sample(mask, step=0)) == 5
    everything = MoeLoraModel(make_tiny_llama(), make_config(contrastive_loss=True, contrastive_tokens=100))
    assert set(everything.contrastive_sample(mask, step=0).tolist()) == real
    # each layer keeps the outputs of exactly those tokens' routed experts (dense: all 3)
    kept = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: kept.append(mod.expert_outputs))
             for layer in mm.injected.values()]
    mm.training_loss(**batch, step=7, total_steps=10)
    for h in hooks:
        h.remove()
    assert all(outputs.shape[0] == 5 * 3 and torch.equal(experts.bincount(), torch.tensor([5, 5, 5]))
               for outputs, experts in kept)


def test_contrastive_loss_on_a_fresh_model_is_finite_and_gives_finite_gradients():
    """At initialisation every B_k = 0, so every expert output is 0 (cosine similarity undefined): the loss is
    log(P - 1) for every anchor and no gradient is NaN."""
    batch = make_batch()
    mm = MoeLoraModel(make_tiny_llama(), make_config(contrastive_loss=True, contrastive_weight=1.0))
    loss, parts = mm.training_loss(**batch, step=0, total_steps=1)
    loss.backward()
    real_tokens = int(batch["attention_mask"].sum())
    assert abs(parts["contrastive"] - math.log(3 * real_tokens - 1)) < 1e-4
    assert all(torch.isfinite(p.grad).all() for p in mm.parameters() if p.requires_grad)


def test_training_with_the_contrastive_loss_makes_the_experts_more_distinct():
    """After the first step the experts' outputs are alike (every expert gets the LM gradient of the same inputs:
    the contrastive part jumps from log(P - 1) at B = 0 to about 12.7); with the loss on, AdamW pulls them
    apart while the LM loss still falls; with weight 0 (logged only) they stay alike."""
    batch = make_batch()
    curves = {}
    for weight in (0.0, 0.1):
        mm = MoeLoraModel(make_tiny_llama(), make_config(top_k=2, contrastive_loss=True, contrastive_weight=weight))
        mm.train()
        optimizer = torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for step in range(7):
            loss, parts = mm.training_loss(**batch, step=step, total_steps=7)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append((parts["lm"], parts["contrastive"]))
        curves[weight] = curve
    for curve in curves.values():
        assert curve[-1][0] < curve[0][0] - 0.05                              # the LM loss falls either way
        assert curve[1][1] > 10                                               # the experts start alike
    assert curves[0.1][-1][1] < curves[0.1][1][1] - 5                          # pulled apart with the loss on ...
    assert curves[0.0][-1][1] > curves[0.1][-1][1] + 5                         # ... and not without it


def test_method_options_reach_the_moelora_config():
    cfg = TrainConfig(method="moelora", num_components=4, method_options={
        "contrastive_loss": True, "contrastive_weight": "0.05", "contrastive_temperature": 0.1,
        "contrastive_tokens": 64})
    moe = method_config(cfg)
    assert (moe.contrastive_loss, moe.contrastive_weight, moe.contrastive_temperature, moe.contrastive_tokens) == \
        (True, 0.05, 0.1, 64)
    with pytest.raises(ValueError, match="contrastive_loss must be true or false"):
        method_config(TrainConfig(method="moelora", method_options={"contrastive_loss": "on"}))

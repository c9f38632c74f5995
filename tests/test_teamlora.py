"""TeamLoRA: split, competition weighting and M's initialisation against float64 loops; every switch of the
paper's ablation (M off / frozen, A not shared) and the router MLP against loops, in parameter counts and in a
save/load round trip; bad configs. The
behaviour it shares with MoELoRA and LoRATRF (pass-through, training, save/load, counts) is in
test_related_methods.py."""

import math

import pytest
import torch
from conftest import logits, make_batch, make_tiny_llama, randomise_lora_B
from conftest import make_teamlora_config as make_config
from torch import nn

from comlora.methods.registry import method_config
from comlora.methods.teamlora import TeamLoraConfig, TeamLoraLinear, TeamLoraModel
from comlora.training.config import TrainConfig

ACTIVATIONS = {"relu": lambda v: max(v, 0.0), "tanh": math.tanh,
               "gelu": lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))), "silu": lambda v: v / (1 + math.exp(-v))}


def reference_router_logits(layer, xn, activation):
    """S(x) by loops: one bias-free linear layer, or Linear + activation + bias-free Linear (router_hidden_size > 0)."""
    if isinstance(layer.router, nn.Linear):
        S = layer.router.weight.detach().double()
        return [float(sum(S[e, i] * xn[i] for i in range(len(xn)))) for e in range(S.shape[0])]
    W1, b1 = layer.router[0].weight.detach().double(), layer.router[0].bias.detach().double()
    W2 = layer.router[2].weight.detach().double()
    hidden = [ACTIVATIONS[activation](float(sum(W1[j, i] * xn[i] for i in range(len(xn))) + b1[j]))
              for j in range(W1.shape[0])]
    return [sum(float(W2[e, j]) * hidden[j] for j in range(len(hidden))) for e in range(W2.shape[0])]


def reference_team_layer(layer, x, activation="gelu"):
    """Explicit loops in float64 over the paper's Eq. 8-13: z = xA split into K slices (or K separate A_i when
    A is not shared), h_i = z_i B_i, phi = softmax(S x), omega_i = sum_j M[i, j] phi_j (omega = phi without M),
    y = W0 x + b + scaling * sum_i omega_i h_i."""
    W0, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    K, r_B, d_out = B.shape
    d_in = W0.shape[1]
    A_cols = [A[:, e * r_B:(e + 1) * r_B] if layer.share_A else A[e] for e in range(K)]   # A_i: [d_in, r_B]
    M = None if layer.interaction is None else layer.interaction.detach().double()
    out, omegas = torch.zeros(x.shape[0], d_out, dtype=torch.float64), []
    for n in range(x.shape[0]):
        xn = x[n].double()
        z = [[sum(xn[i] * A_cols[e][i, c] for i in range(d_in)) for c in range(r_B)] for e in range(K)]
        exps = [math.exp(v) for v in reference_router_logits(layer, xn, activation)]
        phi = [v / sum(exps) for v in exps]
        omega = phi if M is None else [sum(M[e, j] * phi[j] for j in range(K)) for e in range(K)]
        omegas.append([float(w) for w in omega])
        for o in range(d_out):
            y = sum(W0[o, i] * xn[i] for i in range(d_in)) + b[o]
            for e in range(K):
                h = sum(z[e][c] * B[e, c, o] for c in range(r_B))
                y += layer.scaling * omega[e] * h
            out[n, o] = y
    return out, torch.tensor(omegas, dtype=torch.float64)


def test_layer_matches_float64_loops_of_split_and_weighting():
    torch.manual_seed(0)
    layer = TeamLoraLinear(nn.Linear(5, 4), num_experts=3, r_B=2, lora_alpha=6)
    randomise_lora_B([layer])
    with torch.no_grad():        # a non-symmetric M, so that M phi and M^T phi differ
        layer.interaction.copy_(torch.randn(3, 3))
    x = torch.randn(6, 5)
    expected, expected_omega = reference_team_layer(layer, x)
    with torch.no_grad():
        out, omega = layer(x), layer.expert_weights(x)
    assert layer.lora_A.shape == (5, 6) and layer.lora_B.shape == (3, 2, 4)
    assert layer.scaling == 6 / 2
    assert (omega.double() - expected_omega).abs().max() < 1e-6
    assert (out.double() - expected).abs().max() < 1e-5
    with torch.no_grad():
        assert torch.allclose(layer(x.reshape(2, 3, 5)), out.reshape(2, 3, 4), atol=1e-6)


def test_interaction_matrix_starts_uniform_off_diagonal_with_diagonal_one():
    tm = TeamLoraModel(make_tiny_llama(), make_config(num_experts=4))
    matrices = [layer.interaction.detach() for layer in tm.injected.values()]
    off = ~torch.eye(4, dtype=torch.bool)
    for m in matrices:
        assert torch.equal(m.diagonal(), torch.ones(4))
        assert m[off].abs().max() <= 0.1 and m[off].unique().numel() == 12   # drawn, not a constant
    assert not torch.equal(matrices[0], matrices[1])                         # independent per layer
    everything = torch.cat([m[off] for m in matrices])
    assert everything.min() < -0.05 and everything.max() > 0.05             # spans U(-0.1, 0.1)
    identity = TeamLoraModel(make_tiny_llama(), make_config(interaction_init_range=0.0))
    layer = next(iter(identity.injected.values()))
    assert torch.equal(layer.interaction.detach(), torch.eye(3))
    x = torch.randn(4, 32)
    with torch.no_grad():        # M = I: omega is the router's softmax
        assert torch.allclose(layer.expert_weights(x), torch.softmax(layer.router(x), -1))


def test_total_rank_is_filled_in_and_checked():
    assert make_config(num_experts=4, r=2).r_A == 8
    assert make_config(num_experts=4, r=2, r_A=8).r_A == 8
    assert TeamLoraConfig.from_dict(make_config().to_dict()) == make_config()


@pytest.mark.parametrize("overrides, message", [
    (dict(num_experts=0), "num_experts"),
    (dict(r=0), "r must be"),
    (dict(num_experts=4, r_A=10), "r_A=10 is not divisible by num_experts K=4"),
    (dict(num_experts=4, r=2, r_A=16), r"r_A=16 is inconsistent with K \* r_B = 4 \* 2 = 8; set r=4"),
    (dict(interaction_init_range=-0.1), "interaction_init_range"),
    (dict(interaction_matrix="fixed"),
     r"interaction_matrix must be one of \('learned', 'frozen', 'off'\), got 'fixed'"),
    (dict(share_A=1), "share_A must be true or false, got 1"),
    (dict(router_hidden_size=-1), "router_hidden_size must be an integer >= 0, got -1"),
    (dict(router_hidden_size=2.5), "router_hidden_size must be an integer >= 0"),
    (dict(router_activation="swish"), "router_activation must be one of"),
    (dict(lora_alpha=0), "lora_alpha"),
])
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


@pytest.mark.parametrize("switches", [
    dict(router_hidden_size=4, router_activation="gelu"),
    dict(router_hidden_size=3, router_activation="relu"),
    dict(router_hidden_size=4, router_activation="silu"),
    dict(router_hidden_size=2, router_activation="tanh", interaction_matrix="off"),
    dict(interaction_matrix="off"),
    dict(interaction_matrix="frozen"),
    dict(share_A=False),
    dict(share_A=False, interaction_matrix="off"),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_switch_matches_float64_loops(switches):
    """Router MLP, M off (omega = phi), M frozen, A not shared (K independent LoRAs mixed by omega): the
    layer equals the paper's equations computed by loops, with the switch applied by hand."""
    torch.manual_seed(0)
    layer = TeamLoraLinear(nn.Linear(5, 4), num_experts=3, r_B=2, lora_alpha=6, **switches)
    randomise_lora_B([layer])
    if layer.interaction is not None:
        with torch.no_grad():
            layer.interaction.copy_(torch.randn(3, 3))
    x = torch.randn(6, 5)
    expected, expected_omega = reference_team_layer(layer, x, switches.get("router_activation", "gelu"))
    with torch.no_grad():
        out, omega = layer(x), layer.expert_weights(x)
    assert (omega.double() - expected_omega).abs().max() < 1e-6
    assert (out.double() - expected).abs().max() < 1e-5
    if switches.get("interaction_matrix") == "off":
        assert layer.interaction is None
        with torch.no_grad():      # omega is exactly the router's softmax
            assert torch.equal(omega, torch.softmax(layer.router(x), -1))
    if switches.get("share_A") is False:
        assert layer.lora_A.shape == (3, 5, 2)
    if "router_hidden_size" in switches:
        h = switches["router_hidden_size"]
        assert [tuple(p.shape) for p in layer.router.parameters()] == [(h, 5), (h,), (3, h)]


def test_a_not_shared_is_the_shared_layer_with_a_cut_into_its_slices():
    """z_i = split(x A)_i = x A[:, slice i]: with A_i = the i-th column slice of A (and the same router, M and
    B), the two layouts give the same output and the same gradients, and have the same number of weights."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    shared = TeamLoraLinear(base, num_experts=3, r_B=2, lora_alpha=4)
    separate = TeamLoraLinear(base, num_experts=3, r_B=2, lora_alpha=4, share_A=False)
    randomise_lora_B([shared])
    with torch.no_grad():
        separate.lora_A.copy_(shared.lora_A.reshape(6, 3, 2).permute(1, 0, 2))
        separate.lora_B.copy_(shared.lora_B)
        separate.router.weight.copy_(shared.router.weight)
        separate.interaction.copy_(shared.interaction)
    assert shared.lora_A.numel() == separate.lora_A.numel() == 6 * 3 * 2
    x = torch.randn(2, 4, 6)
    y_shared, y_separate = shared(x), separate(x)
    assert torch.allclose(y_shared, y_separate, atol=1e-6)
    y_shared.square().sum().backward()
    y_separate.square().sum().backward()
    assert torch.allclose(shared.lora_A.grad.reshape(6, 3, 2).permute(1, 0, 2), separate.lora_A.grad, atol=1e-5)
    assert torch.allclose(shared.lora_B.grad, separate.lora_B.grad, atol=1e-5)
    assert torch.allclose(shared.interaction.grad, separate.interaction.grad, atol=1e-5)


def test_frozen_interaction_gets_no_gradient_and_stays_at_its_initialisation():
    batch = make_batch()
    runs = {}
    for mode in ("learned", "frozen"):
        tm = TeamLoraModel(make_tiny_llama(), make_config(interaction_matrix=mode))
        start = {n: layer.interaction.detach().clone() for n, layer in tm.injected.items()}
        router_start = next(iter(tm.injected.values())).router.weight.detach().clone()
        trainable = [p for p in tm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        for step in range(2):
            loss, _ = tm.training_loss(**batch, step=step, total_steps=2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        runs[mode] = tm
        layer = next(iter(tm.injected.values()))
        assert not torch.equal(layer.router.weight.detach(), router_start)        # the rest trains
        moved = [not torch.equal(layer.interaction.detach(), start[n]) for n, layer in tm.injected.items()]
        if mode == "frozen":
            assert not any(moved)
            assert all(not l.interaction.requires_grad and l.interaction.grad is None for l in tm.injected.values())
            assert all(not any(p is l.interaction for p in trainable) for l in tm.injected.values())
        else:
            assert all(moved)
    # the frozen M is the same draw as the learned one's start: freezing changes nothing else
    learned = TeamLoraModel(make_tiny_llama(), make_config())
    for name, layer in runs["frozen"].injected.items():
        assert torch.equal(layer.interaction.detach(), learned.injected[name].interaction.detach())


# the tiny Llama's q_proj 32->32, v_proj 32->16, down_proj 48->32 on 2 layers; K = 3, r_B = 2
SHAPES = [(32, 32), (32, 16), (48, 32)]
SHARED_ADAPTER = 2 * sum(d_in * 3 * 2 + 3 * 2 * d_out for d_in, d_out in SHAPES)


@pytest.mark.parametrize("switches, adapter, router", [
    (dict(), SHARED_ADAPTER, 2 * sum(d_in * 3 + 9 for d_in, _ in SHAPES)),
    (dict(share_A=False), SHARED_ADAPTER, 2 * sum(d_in * 3 + 9 for d_in, _ in SHAPES)),
    (dict(interaction_matrix="off"), SHARED_ADAPTER, 2 * sum(d_in * 3 for d_in, _ in SHAPES)),
    (dict(interaction_matrix="frozen"), SHARED_ADAPTER, 2 * sum(d_in * 3 for d_in, _ in SHAPES)),   # M not trainable
    (dict(router_hidden_size=5), SHARED_ADAPTER, 2 * sum(d_in * 5 + 5 + 5 * 3 + 9 for d_in, _ in SHAPES)),
], ids=["default", "share_A=False", "M off", "M frozen", "router MLP h=5"])
def test_parameter_counts_of_each_switch(switches, adapter, router):
    tm = TeamLoraModel(make_tiny_llama(), make_config(**switches))
    c = tm.parameter_counts()
    assert (c["adapter"], c["router"]) == (adapter, router)
    assert c["adapter"] + c["router"] == sum(p.numel() for p in tm.parameters() if p.requires_grad)
    assert c["base"] == sum(p.numel() for p in make_tiny_llama().parameters())


@pytest.mark.parametrize("switches", [
    dict(router_hidden_size=4, router_activation="silu"), dict(interaction_matrix="frozen"),
    dict(interaction_matrix="off"), dict(share_A=False),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_save_load_round_trip_with_each_switch(switches, tmp_path):
    batch = make_batch()
    tm = TeamLoraModel(make_tiny_llama(), make_config(seed=11, **switches))
    randomise_lora_B(tm.injected.values())
    with torch.no_grad():          # move every other tensor away from its seeded draw, so the load must restore it
        for name, p in tm.state_tensors().items():
            if "lora_B" not in name:
                p.add_(0.01 * torch.randn(p.shape))
    tm.save(tmp_path / "state")
    loaded = TeamLoraModel.load(make_tiny_llama(), tmp_path / "state")
    assert loaded.config == tm.config
    saved, restored = tm.state_tensors(), loaded.state_tensors()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert any("interaction" in k for k in saved) == (switches.get("interaction_matrix") != "off")
    assert all(l.interaction is None or l.interaction.requires_grad == (switches.get("interaction_matrix") != "frozen")
               for l in loaded.injected.values())
    assert torch.equal(logits(loaded, batch), logits(tm, batch))


def test_method_options_reach_the_teamlora_config():
    cfg = TrainConfig(method="teamlora", num_components=4, r=2, method_options={
        "interaction_matrix": "frozen", "share_A": False, "router_hidden_size": "16", "router_activation": "relu"})
    team = method_config(cfg)
    assert (team.interaction_matrix, team.share_A, team.router_hidden_size, team.router_activation) == \
        ("frozen", False, 16, "relu")
    with pytest.raises(ValueError, match="share_A must be true or false"):
        method_config(TrainConfig(method="teamlora", method_options={"share_A": "no"}))

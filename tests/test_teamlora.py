"""TeamLoRA: split, competition weighting and M's initialisation against float64 loops, bad configs. The
behaviour it shares with MoELoRA and LoRATRF (pass-through, training, save/load, counts) is in
test_related_methods.py."""

import math

import pytest
import torch
from torch import nn

from comlora.teamlora import TeamLoraConfig, TeamLoraLinear, get_teamlora_model

from conftest import make_teamlora_config as make_config
from conftest import make_tiny_llama, randomise_lora_B


def reference_team_layer(layer, x):
    """Explicit loops in float64 over the paper's Eq. 8-13: z = xA split into K slices, h_i = z_i B_i,
    phi = softmax(S x), omega_i = sum_j M[i, j] phi_j, y = W0 x + b + scaling * sum_i omega_i h_i."""
    W0, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    S, M = layer.router.weight.detach().double(), layer.interaction.detach().double()
    d_in, r_A = A.shape
    K, r_B, d_out = B.shape
    out, omegas = torch.zeros(x.shape[0], d_out, dtype=torch.float64), []
    for n in range(x.shape[0]):
        xn = x[n].double()
        z = [sum(xn[i] * A[i, c] for i in range(d_in)) for c in range(r_A)]
        slices = [z[e * r_B:(e + 1) * r_B] for e in range(K)]
        exps = [math.exp(float(sum(S[e, i] * xn[i] for i in range(d_in)))) for e in range(K)]
        phi = [v / sum(exps) for v in exps]
        omega = [sum(M[e, j] * phi[j] for j in range(K)) for e in range(K)]
        omegas.append(omega)
        for o in range(d_out):
            y = sum(W0[o, i] * xn[i] for i in range(d_in)) + b[o]
            for e in range(K):
                h = sum(slices[e][c] * B[e, c, o] for c in range(r_B))
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
    tm = get_teamlora_model(make_tiny_llama(), make_config(num_experts=4))
    matrices = [layer.interaction.detach() for layer in tm.injected.values()]
    off = ~torch.eye(4, dtype=torch.bool)
    for m in matrices:
        assert torch.equal(m.diagonal(), torch.ones(4))
        assert m[off].abs().max() <= 0.1 and m[off].unique().numel() == 12   # drawn, not a constant
    assert not torch.equal(matrices[0], matrices[1])                         # independent per layer
    everything = torch.cat([m[off] for m in matrices])
    assert everything.min() < -0.05 and everything.max() > 0.05             # spans U(-0.1, 0.1)
    identity = get_teamlora_model(make_tiny_llama(), make_config(interaction_init_range=0.0))
    layer = next(iter(identity.injected.values()))
    assert torch.equal(layer.interaction.detach(), torch.eye(3))
    x = torch.randn(4, 32)
    with torch.no_grad():        # M = I: omega is the router's softmax
        assert torch.allclose(layer.expert_weights(x), torch.softmax(layer.router(x), -1))


def test_total_rank_is_filled_in_and_checked():
    assert make_config(num_experts=4, r_B=2).r_A == 8
    assert make_config(num_experts=4, r_B=2, r_A=8).r_A == 8
    assert TeamLoraConfig.from_dict(make_config().to_dict()) == make_config()


@pytest.mark.parametrize("overrides, message", [
    (dict(num_experts=0), "num_experts"),
    (dict(r_B=0), "r_B must be"),
    (dict(num_experts=4, r_A=10), "r_A=10 is not divisible by num_experts K=4"),
    (dict(num_experts=4, r_B=2, r_A=16), r"r_A=16 is inconsistent with K \* r_B = 4 \* 2 = 8; set r_B=4"),
    (dict(interaction_init_range=-0.1), "interaction_init_range"),
    (dict(lora_alpha=0), "lora_alpha"),
])
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)

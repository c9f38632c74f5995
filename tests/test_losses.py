"""Each loss against an independent float64 hand computation (explicit loops, math module)."""

import math

import pytest
import torch

from comlora.methods.comlora.losses import add_noise, alignment_loss, anneal_eta, pairwise_loss
from comlora.methods.losses import per_sample_token_loss

SIM = [[0.3, -0.2, 0.9], [1.5, 0.1, -0.4]]
LOSS = [[2.0, 1.0, 3.5], [0.7, 1.9, 1.2]]


def log_softmax(values):
    m = max(values)
    z = math.log(sum(math.exp(v - m) for v in values)) + m
    return [v - z for v in values]


def hand_pairwise(sim, loss, direction):
    total = 0.0
    for s, l in zip(sim, loss):
        pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if i != j]
        sv = [s[i] - s[j] for i, j in pairs]
        pv = [(l[j] - l[i]) if direction == "intended" else (l[i] - l[j]) for i, j in pairs]
        total += sum(abs(a - b) for a, b in zip(log_softmax(sv), log_softmax(pv)))
    return total / len(sim)


@pytest.mark.parametrize("direction", ["intended", "literal"])
def test_pairwise_loss_matches_hand_computation(direction):
    got = pairwise_loss(torch.tensor(SIM, dtype=torch.float64), torch.tensor(LOSS, dtype=torch.float64), direction)
    assert got.item() == pytest.approx(hand_pairwise(SIM, LOSS, direction), abs=1e-12)


def test_pairwise_loss_is_zero_when_similarity_ranks_like_negative_loss():
    loss = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    assert pairwise_loss(-loss, loss, "intended").item() == pytest.approx(0.0, abs=1e-12)
    assert pairwise_loss(-loss, loss, "literal").item() > 1.0


@pytest.mark.parametrize("detach", [True, False])
def test_pairwise_gradient_reaches_losses_only_when_not_detached(detach):
    sim = torch.tensor(SIM, dtype=torch.float64, requires_grad=True)
    loss = torch.tensor(LOSS, dtype=torch.float64, requires_grad=True)
    pairwise_loss(sim, loss.detach() if detach else loss).backward()
    assert sim.grad.abs().sum() > 0
    assert (loss.grad is None) == detach


def hand_alignment(sim, loss, top_n, eta, sign):
    total = 0.0
    for s, l in zip(sim, loss):
        top = sorted(range(len(s)), key=lambda k: -s[k])[:top_n]
        z = sum(math.exp(s[k]) for k in top)
        total += sum(math.exp(s[k]) / z * l[k] for k in top)
    return sign * eta * total / len(sim)


@pytest.mark.parametrize("top_n", [1, 2, 3])
@pytest.mark.parametrize("sign", [1, -1])
def test_alignment_loss_matches_hand_computation(top_n, sign):
    got = alignment_loss(torch.tensor(SIM, dtype=torch.float64), torch.tensor(LOSS, dtype=torch.float64), top_n, 0.7,
                         sign)
    assert got.item() == pytest.approx(hand_alignment(SIM, LOSS, top_n, 0.7, sign), abs=1e-12)


def test_alignment_loss_sends_no_gradient_to_the_selector():
    sim = torch.tensor(SIM, requires_grad=True)
    loss = torch.tensor(LOSS, requires_grad=True)
    alignment_loss(sim, loss, 2, 1.0).backward()
    assert sim.grad is None
    assert loss.grad.abs().sum() > 0


@pytest.mark.parametrize("schedule, expected", [
    ("constant", (1.0, 1.0, 1.0)),
    ("linear", (0.0, 0.5, 1.0)),
    ("cosine", (0.0, 0.5, 1.0)),
    ("exponential", (0.0, 1 - math.exp(-2.5), 1 - math.exp(-5.0))),
])
def test_annealing_schedules_at_start_middle_end(schedule, expected):
    got = tuple(anneal_eta(schedule, t, 100, rate=5.0) for t in (0, 50, 100))
    assert got == pytest.approx(expected, abs=1e-12)


def test_annealing_rejects_unknown_schedule_and_bad_total():
    with pytest.raises(ValueError, match="unknown annealing"):
        anneal_eta("step", 1, 10)
    with pytest.raises(ValueError, match="total_steps"):
        anneal_eta("linear", 1, 0)


def test_noise_off_is_exact_and_on_has_the_right_statistics():
    losses = torch.full((200, 100), 3.0, dtype=torch.float64)
    assert torch.equal(add_noise(losses, 0.0), losses)
    noisy = add_noise(losses, 0.1, torch.Generator().manual_seed(0)) - losses
    assert abs(noisy.mean().item()) < 0.1 * 4 / math.sqrt(noisy.numel())
    assert noisy.std().item() == pytest.approx(0.1, rel=0.03)
    again = add_noise(losses, 0.1, torch.Generator().manual_seed(0)) - losses
    assert torch.equal(noisy, again)


def test_per_sample_token_loss_mean_sum_and_empty_sample():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([0, 0, 1])
    sample = torch.tensor([0, 0, 2])
    nll = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(1)), math.log(2)]
    mean, count = per_sample_token_loss(logits, targets, sample, 3, "mean")
    total, _ = per_sample_token_loss(logits, targets, sample, 3, "sum")
    assert mean.tolist() == pytest.approx([(nll[0] + nll[1]) / 2, 0.0, nll[2]])
    assert total.tolist() == pytest.approx([nll[0] + nll[1], 0.0, nll[2]])
    assert count.tolist() == [2, 0, 1]

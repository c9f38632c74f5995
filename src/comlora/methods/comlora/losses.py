"""The competition's losses (docs/method.md): the annealing schedule eta(t), the noisy per-sample losses, the
pairwise ranking loss and the alignment loss over the selector's similarities."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def anneal_eta(schedule: str, step: int, total_steps: int, rate: float = 5.0) -> float:
    """eta(t): constant 1; cosine 0.5(1 - cos(pi t/T)); exponential 1 - exp(-rate t/T); linear t/T (Eq. 13-14)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    if schedule == "exponential":
        return 1.0 - math.exp(-rate * progress)
    if schedule == "linear":
        return progress
    raise ValueError(f"unknown annealing schedule {schedule!r}; choose one of constant, cosine, exponential, linear")


def add_noise(losses: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """l~ = l + alpha * eps, eps ~ N(0, 1) (Eq. 6)."""
    if alpha == 0:
        return losses
    eps = torch.randn(losses.shape, generator=generator, dtype=losses.dtype, device="cpu").to(losses.device)
    return losses + alpha * eps


def _pair_differences(values: torch.Tensor) -> torch.Tensor:
    """[B, K] -> [B, K(K-1)] of values_i - values_j over ordered pairs i != j (row-major)."""
    k = values.shape[1]
    diff = values.unsqueeze(2) - values.unsqueeze(1)                 # [B, K, K], diff[b,i,j] = v_i - v_j
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=values.device)
    return diff[:, off_diagonal]


def pairwise_loss(sim: torch.Tensor, noisy_losses: torch.Tensor, direction: str = "intended") -> torch.Tensor:
    """L_pair = mean_b sum_{i != j} |logsoftmax(S)[i,j] - logsoftmax(P)[i,j]| (Eq. 7-9).

    S[i,j] = sim_i - sim_j; P[i,j] = l~_j - l~_i ('intended': lower loss -> higher similarity)
    or l~_i - l~_j ('literal'). Softmax over all K(K-1) ordered pairs of a sample. K = 1 gives 0.
    """
    if sim.shape[1] < 2:
        return sim.sum() * 0.0
    s = _pair_differences(sim)
    p = _pair_differences(noisy_losses)
    if direction == "intended":
        p = -p
    elif direction != "literal":
        raise ValueError(f"pairwise direction must be 'intended' or 'literal', got {direction!r}")
    return (F.log_softmax(s, dim=-1) - F.log_softmax(p, dim=-1)).abs().sum(-1).mean()


def alignment_loss(sim: torch.Tensor, losses: torch.Tensor, top_n: int, eta: float, sign: int = 1) -> torch.Tensor:
    """L_align = sign * eta * mean_b sum_{k in topN(sim_b)} p[b,k] l[b,k], p = softmax(sim over the top N),
    detached (Eq. 5)."""
    top_sim, top_idx = sim.detach().topk(top_n, dim=-1)
    weights = torch.softmax(top_sim, dim=-1)
    return sign * eta * (weights * losses.gather(1, top_idx)).sum(-1).mean()

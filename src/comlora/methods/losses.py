"""The three ComLoRA losses and the annealing schedule (spec sections 2, 4, 5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def per_sample_token_loss(logits: torch.Tensor, targets: torch.Tensor, sample_index: torch.Tensor,
                          num_samples: int, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """l[s] = mean (or sum) over the target tokens of sample s of -log p(target).

    ``logits [N, V]`` and ``targets [N]`` are the target tokens of all samples flattened,
    ``sample_index [N]`` says which sample each belongs to. Returns ``(l [S], token_count [S])``;
    a sample with no target token gets l = 0 and count 0 (callers leave it out).
    """
    nll = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")
    total = torch.zeros(num_samples, dtype=nll.dtype, device=nll.device).index_add(0, sample_index, nll)
    count = torch.zeros(num_samples, dtype=nll.dtype, device=nll.device).index_add(0, sample_index, torch.ones_like(nll))
    if reduction == "sum":
        return total, count
    return total / count.clamp_min(1.0), count


def decoder_stack(causal_lm: nn.Module) -> nn.Module:
    """``causal_lm.base_model``: the decoder whose forward returns the final hidden states (``model`` on Llama,
    Qwen, Mistral, Phi-3, Gemma and OPT, ``transformer`` on GPT-2 and Falcon, ``gpt_neox`` on GPT-NeoX)."""
    decoder = getattr(causal_lm, "base_model", causal_lm)
    if decoder is causal_lm or causal_lm.get_output_embeddings() is None:
        raise ValueError(f"{type(causal_lm).__name__} is not a causal LM made of a decoder (base_model) and an LM head "
                         "(get_output_embeddings): the target-only LM head needs both")
    return decoder


def lm_head_logits(causal_lm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """z = W_head h, post-processed as the model's own forward does: Gemma-2/3 z <- cap * tanh(z / cap)
    (``final_logit_softcapping``), Cohere z <- z * logit_scale. Scalings whose meaning differs between models
    (``logits_scaling``: Granite divides by it, HyperCLOVA X multiplies) are refused."""
    text_config = causal_lm.config.get_text_config()
    if getattr(text_config, "logits_scaling", None) not in (None, 1, 1.0):
        raise NotImplementedError(f"{type(causal_lm).__name__} rescales its logits by logits_scaling="
                                  f"{text_config.logits_scaling}, which the target-only LM head does not reproduce")
    logits = causal_lm.get_output_embeddings()(hidden)
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(causal_lm, "logit_scale", None)          # Cohere's forward multiplies by self.logit_scale
    if isinstance(scale, (int, float)):
        logits = logits * scale
    return logits


def sequence_losses(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    copies: int = 1, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample LM loss of a causal LM on a batch replicated ``copies`` times: ``l [B, copies]``, counts ``[B]``.

    Copy c is rows c*B .. (c+1)*B-1 of the replicated batch (ComLoRA's competition layout). The LM
    head runs only where the shifted label is a target token, never on the full ``[copies*B, L, V]``.
    """
    decoder = decoder_stack(causal_lm)
    b, length = input_ids.shape
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)   # position cols predicts token cols + 1
    if copies > 1:
        input_ids, attention_mask = input_ids.repeat(copies, 1), attention_mask.repeat(copies, 1)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden = hidden.view(copies, b, length, hidden.shape[-1])[:, rows, cols]                     # [copies, N, d]
    logits = lm_head_logits(causal_lm, hidden).flatten(0, 1)                                   # [copies*N, V]
    sample = (torch.arange(copies, device=rows.device).unsqueeze(1) * b + rows).reshape(-1)
    losses, counts = per_sample_token_loss(logits, targets[rows, cols].repeat(copies), sample, copies * b, reduction)
    return losses.reshape(copies, b).T, counts[:b]


def mean_lm_loss(causal_lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """L_LM = mean over samples with a target token of the per-sample mean NLL (ComLoRA's Eq. 4 with K = 1).

    Returns ``(L_LM, number of target tokens)``.
    """
    losses, counts = sequence_losses(causal_lm, input_ids, attention_mask, labels)
    valid = counts > 0
    if not bool(valid.any()):
        raise ValueError("the batch has no target token at all (every label is -100): check the label masking "
                         "and cutoff_len; prompts longer than cutoff_len leave no response token")
    return losses[valid, 0].mean(), int(counts.sum())


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
    """L_align = sign * eta * mean_b sum_{k in topN(sim_b)} p[b,k] l[b,k], p = softmax(sim over the top N), detached (Eq. 5)."""
    top_sim, top_idx = sim.detach().topk(top_n, dim=-1)
    weights = torch.softmax(top_sim, dim=-1)
    return sign * eta * (weights * losses.gather(1, top_idx)).sum(-1).mean()

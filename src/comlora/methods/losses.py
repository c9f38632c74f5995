"""Language-model losses every method uses: per-sample token cross-entropy over the target tokens (labels != -100),
for one batch or K replicated copies of it, and their mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from comlora.data.items import IGNORE_INDEX


def per_sample_token_loss(logits: torch.Tensor, targets: torch.Tensor, sample_index: torch.Tensor,
                          num_samples: int, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """l[s] = mean (or sum) over the target tokens of sample s of -log p(target).

    ``logits [N, V]`` and ``targets [N]`` are the target tokens of all samples flattened,
    ``sample_index [N]`` says which sample each belongs to. Returns ``(l [S], token_count [S])``;
    a sample with no target token gets l = 0 and count 0 (callers leave it out).
    """
    nll = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")
    total = torch.zeros(num_samples, dtype=nll.dtype, device=nll.device).index_add(0, sample_index, nll)
    count = torch.zeros(num_samples, dtype=nll.dtype, device=nll.device).index_add(0, sample_index,
                                                                                  torch.ones_like(nll))
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

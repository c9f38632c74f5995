"""Teacher-forced scoring: the summed log-probability of given continuations after given contexts, in batched
forward passes (docs/evaluation.md, "Log-likelihood scoring")."""

from __future__ import annotations

import copy

import torch


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-evaluation-harness's rule: the context's trailing whitespace moves to the start of the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids (context, continuation) as lm-evaluation-harness's ``_encode_pair`` makes them, after ``split_pair``:
    context_enc = tok(context), continuation_enc = tok(context + continuation)[len(context_enc):]. Where the text's
    tokens merge across the boundary, the model still reads context_enc + continuation_enc."""
    context, continuation = split_pair(context, continuation)
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    return context_ids, whole[len(context_ids):]


def pad_token_id(tokenizer) -> int:
    """The id that fills padding (masked out, so any id works): pad, else EOS, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


@torch.no_grad()
def continuation_logliks(model, groups: list[tuple[list[int], list[list[int]]]], pad_id: int, batch_size: int = 8,
                         progress=None) -> list[list[float]]:
    """log p(c | x) = sum_t log softmax(f(x + c_<t))[c_t] for every continuation c of each group (context ids x,
    [continuation ids c, ...]); the continuations of a group share one pass over its context.

    The tokens every context starts with (the prompt template's header) are read once, into a key/value cache.
    The groups are sorted by context length (least padding) and taken ``batch_size`` at a time: one forward pass
    reads the rest of their contexts on copies of that cache, left-padded after it (positions counted over the
    real tokens), keeping the cache and the last position's logits, which score every c_0. Then the
    continuations, longest first, ``batch_size`` at a time, each on a copy of its context's cache, read c without
    its last token, right-padded after the context, to score c_1, c_2, ... log_softmax runs in float32, the sums
    in float64. Returns the sums per group, in the order of ``groups``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for g, (context, continuations) in enumerate(groups):
        if not context or not continuations or not all(continuations):
            raise ValueError(f"group {g} has an empty context or continuation: nothing to condition on or to score")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max((len(x) + len(c) for x, cs in groups for c in cs), default=0)
    if limit is not None and longest > limit:
        raise ValueError(f"a context + continuation of {longest} tokens exceeds the model's {limit} positions")
    device = next(model.parameters()).device
    prefix = shared_prefix([x for x, _ in groups])
    if prefix:
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
        key = cache_key(out)
        prefix_cache = out[key]
    order = sorted(range(len(groups)), key=lambda g: -len(groups[g][0]))
    sums: list[list[float]] = [[] for _ in groups]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_padded([groups[g][0][len(prefix):] for g in chunk], pad_id)
        mask = torch.cat([torch.ones((len(chunk), len(prefix)), dtype=torch.long), mask], 1)
        shared = {}
        if prefix:
            shared = {key: copy.deepcopy(prefix_cache)}
            shared[key].reorder_cache(torch.zeros(len(chunk), dtype=torch.long, device=device))
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, logits_to_keep=1,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, len(prefix):].to(device), **shared)
        first = out.logits[:, -1].float().log_softmax(-1).cpu()
        key = cache_key(out)
        rows = [(r, c) for r, g in enumerate(chunk) for c in groups[g][1]]      # (context row, continuation)
        scores = [first[r, c[0]].item() for r, c in rows]
        longer = sorted((i for i, (_, c) in enumerate(rows) if len(c) > 1), key=lambda i: -len(rows[i][1]))
        for sub in range(0, len(longer), batch_size):
            part = longer[sub:sub + batch_size]
            cache = out[key] if sub + batch_size >= len(longer) else copy.deepcopy(out[key])   # the last: itself
            rest = rest_logliks(model, key, cache, mask, [rows[i] for i in part], pad_id, device)
            for i, value in zip(part, rest):
                scores[i] += value
        flat = iter(scores)
        for g in chunk:
            sums[g] = [next(flat) for _ in groups[g][1]]
        if progress is not None:
            progress(len(chunk))
    return sums


def rest_logliks(model, cache_name: str, cache, context_mask: torch.Tensor, rows: list[tuple[int, list[int]]],
                 pad_id: int, device) -> list[float]:
    """sum_{t>=1} log p(c_t | x, c_<t) of each row (context row r, continuation c) given the contexts' ``cache``
    (left-padded as ``context_mask``), which is reordered to one row each."""
    source = torch.tensor([r for r, _ in rows])
    cache.reorder_cache(source.to(device))
    width = max(len(c) - 1 for _, c in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.zeros_like(inputs)
    scored = torch.zeros_like(inputs, dtype=torch.bool)
    for i, (_, c) in enumerate(rows):
        inputs[i, :len(c) - 1], targets[i, :len(c) - 1], scored[i, :len(c) - 1] = (
            torch.tensor(c[:-1]), torch.tensor(c[1:]), True)
    positions = context_mask.sum(-1)[source, None] + torch.arange(width)
    mask = torch.cat([context_mask[source], scored.long()], 1)
    logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   **{cache_name: cache}).logits
    logprobs = logits.float().log_softmax(-1).gather(-1, targets.to(device)[..., None])[..., 0].cpu().double()
    return [logprobs[i][scored[i]].sum().item() for i in range(len(rows))]


def cache_key(output) -> str:
    """The field of a model output, and the forward argument, holding the key/value cache: ``cache`` in
    transformers 5.25 (``past_key_values``, its deprecated name, in earlier versions)."""
    return "cache" if "cache" in output.keys() else "past_key_values"


def shared_prefix(contexts: list[list[int]]) -> list[int]:
    """The tokens all ``contexts`` start with, leaving each at least one token of its own."""
    shortest = min(map(len, contexts), default=1)
    length = 0
    while length < shortest - 1 and all(x[length] == contexts[0][length] for x in contexts):
        length += 1
    return contexts[0][:length] if len(contexts) > 1 else []


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``sequences`` left-padded to the longest."""
    length = max(map(len, sequences))
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq):] = torch.tensor(seq)
        mask[row, length - len(seq):] = 1
    return ids, mask


def multiple_choice(option_loglik: list[float], options: list[str]) -> dict[str, int]:
    """lm-evaluation-harness's multiple-choice predictions (the first index on a tie): ``acc`` = argmax of the
    summed log-likelihoods, ``acc_norm`` = argmax of loglik / the option's length in characters, ``acc_bytes`` =
    argmax of loglik / its length in UTF-8 bytes."""
    lengths = {"acc": [1] * len(options), "acc_norm": [len(o) for o in options],
               "acc_bytes": [len(o.encode("utf-8")) for o in options]}
    return {metric: max(range(len(options)), key=lambda i: option_loglik[i] / by[i]) for metric, by in lengths.items()}

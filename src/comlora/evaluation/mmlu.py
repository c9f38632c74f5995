"""MMLU scoring (docs/evaluation.md): by next-token log-probabilities of ' A'..' D' or by generation, aggregated
per subject and category."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from comlora import markdown
from comlora.data.items import format_prompt as alpaca_prompt
from comlora.data.mmlu import (
    ANSWER_PREFIX,
    CATEGORIES,
    LETTERS,
    SUBJECT_CATEGORIES,
    UNCATEGORIZED,
    format_prompt,
    load_mmlu,
    mmlu_training_item,
)
from comlora.evaluation.generation import generate_texts
from comlora.evaluation.settings import EvalSettings, option

if TYPE_CHECKING:
    import torch

MODES = ("logits", "generate")
PROMPT_STYLES = ("harness", "alpaca")


# -----------------------------------------------------------------------------
# scoring

def extract_letter(response: str) -> str | None:
    """The first standalone capital A, B, C or D in ``response`` (not part of a longer word or letter run:
    'B', ' B.', '(C)', 'answer is D' count; 'Apple', 'AB', 'b' do not); None if there is none."""
    found = re.search(r"(?<![A-Za-z0-9])([ABCD])(?![A-Za-z0-9])", response)
    return found.group(1) if found else None


# -----------------------------------------------------------------------------
# scoring

def _continuation_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as it is tokenized after the context."""
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]  # a merge across the boundary


def _last_logprobs(model, sequences: list[list[int]], keep: int, pad_id: int) -> torch.Tensor:
    """Log-softmax over the vocabulary at the last ``keep`` positions of each left-padded sequence."""
    import torch  # here, not at the top: the command line's options load this module (comlora eval --help)

    device = next(model.parameters()).device
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq):] = torch.tensor(seq)
        mask[row, length - len(seq):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                    logits_to_keep=keep)
    return out.logits[:, -keep:].float().log_softmax(-1).cpu()


def letter_logprobs(model, tokenizer, contexts: list[str], batch_size: int = 8, max_length: int | None = None,
                    progress=None) -> tuple[list[list[float]], dict]:
    """Per context, the log-likelihood of each continuation " A", " B", " C", " D" (summed over its tokens).

    When every continuation is one token (e.g. 'ĠA' in GPT-2-style BPE), one forward pass per context
    reads the four from its last position; otherwise each context+continuation is scored. Contexts longer
    than ``max_length`` minus the continuation lose tokens on the left. Also returns how each letter was
    tokenized and which contexts were truncated.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [[_continuation_ids(tokenizer, c, " " + letter) for letter in LETTERS] for c in contexts]
    single = all(len(cont) == 1 for item in encoded for _, cont in item)
    longest = max((len(cont) for item in encoded for _, cont in item), default=1)
    budget = None if max_length is None else max_length - (0 if single else longest)
    if budget is not None and budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for a context")
    truncated = [budget is not None and len(item[0][0]) > budget for item in encoded]
    if budget is not None:
        encoded = [[(ctx[-budget:], cont) for ctx, cont in item] for item in encoded]
    scores: list[list[float]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        if single:
            lp = _last_logprobs(model, [item[0][0] for item in chunk], 1, pad_id)
            scores.extend([lp[row, -1, cont[0]].item() for _, cont in item] for row, item in enumerate(chunk))
        else:
            pairs = [pair for item in chunk for pair in item]
            keep = max(len(cont) for _, cont in pairs) + 1
            lp = _last_logprobs(model, [ctx + cont for ctx, cont in pairs], keep, pad_id)
            flat = [sum(lp[row, keep - 1 - len(cont) + j, tok].item() for j, tok in enumerate(cont))
                    for row, (_, cont) in enumerate(pairs)]
            scores.extend(flat[i:i + len(LETTERS)] for i in range(0, len(flat), len(LETTERS)))
        if progress is not None:
            progress(len(chunk))
    tokens = ({letter: tokenizer.convert_ids_to_tokens(cont) for letter, (_, cont) in zip(LETTERS, encoded[0])}
              if encoded else {})
    return scores, {"continuation_tokens": tokens, "single_token": single, "truncated": truncated}


def _percent(correct: int, n: int) -> float:
    return 100.0 * correct / n if n else 0.0


def aggregate(rows: list[dict]) -> dict:
    """Accuracy (0-100) per subject, per category (over the category's items), micro average (over all
    items, so subjects weigh by size) and macro average (mean of the subject accuracies)."""
    subjects: dict[str, dict] = {}
    for row in rows:
        s = subjects.setdefault(row["subject"], {"n": 0, "correct": 0})
        s["n"] += 1
        s["correct"] += bool(row["correct"])
    categories: dict[str, dict] = {}
    for subject, s in sorted(subjects.items()):
        s["accuracy"] = _percent(s["correct"], s["n"])
        c = categories.setdefault(SUBJECT_CATEGORIES.get(subject, UNCATEGORIZED), {"n": 0, "correct": 0, "subjects": 0})
        c["n"] += s["n"]
        c["correct"] += s["correct"]
        c["subjects"] += 1
    for c in categories.values():
        c["accuracy"] = _percent(c["correct"], c["n"])
    total = sum(s["n"] for s in subjects.values())
    return {"subjects": dict(sorted(subjects.items())),
            "categories": {k: categories[k] for k in CATEGORIES + [UNCATEGORIZED] if k in categories},
            "micro_average": _percent(sum(s["correct"] for s in subjects.values()), total),
            "macro_average": sum(s["accuracy"] for s in subjects.values()) / len(subjects) if subjects else 0.0,
            "n": total}


def _shots_by_subject(dev_items: list[dict] | None, k: int) -> dict[str, list[dict]]:
    if k == 0:
        return {}
    if not dev_items:
        raise ValueError(f"shots_per_subject={k} needs dev_items (load_mmlu(root, split='dev'))")
    shots: dict[str, list[dict]] = {}
    for item in dev_items:
        shots.setdefault(item["subject"], []).append(item)
    return {subject: rows[:k] for subject, rows in shots.items()}


def evaluate_mmlu(model, tokenizer, items: list[dict], shots_per_subject: int = 0, dev_items: list[dict] | None = None,
                  mode: str = "logits", prompt_style: str = "harness", batch_size: int = 8, max_new_tokens: int = 8,
                  max_length: int | None = None) -> dict:
    """Accuracy on ``items`` with every item's prediction (see ``aggregate`` for the averages).

    prompt_style 'harness': ``format_prompt`` with the first ``shots_per_subject`` dev items of the subject
    as shots; 'alpaca': the Alpaca prompt around ``mmlu_training_item`` (zero-shot), the form a model
    fine-tuned on ``mmlu_training_items`` saw. mode 'logits': the letter whose continuation " X" has the
    highest log-likelihood after 'Answer:' (alpaca: after 'the correct answer is'); 'generate': greedy
    generation of ``max_new_tokens`` tokens and ``extract_letter``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown MMLU mode {mode!r}; choose one of {MODES}")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"unknown MMLU prompt_style {prompt_style!r}; choose one of {PROMPT_STYLES}")
    if shots_per_subject < 0 or (prompt_style == "alpaca" and shots_per_subject):
        raise ValueError(f"shots_per_subject must be >= 0, and 0 with prompt_style 'alpaca'; got {shots_per_subject}")
    started = time.perf_counter()
    shots = _shots_by_subject(dev_items, shots_per_subject)
    if prompt_style == "harness":
        prompts = [format_prompt(item, shots.get(item["subject"], [])) for item in items]
    else:
        prompts = [alpaca_prompt(mmlu_training_item(item)) for item in items]
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    settings = {"mode": mode, "prompt_style": prompt_style, "shots_per_subject": shots_per_subject,
                "batch_size": batch_size, "max_new_tokens": max_new_tokens if mode == "generate" else None,
                "max_length": max_length if mode == "logits" else None}
    rows = [{"subject": item["subject"], "index": item.get("index"), "answer": LETTERS[item["answer"]]}
            for item in items]
    with tqdm(total=len(items), desc=f"mmlu ({mode})", dynamic_ncols=True) as bar:
        if mode == "logits":
            contexts = prompts if prompt_style == "harness" else [p + ANSWER_PREFIX for p in prompts]
            scores, info = letter_logprobs(model, tokenizer, contexts, batch_size, max_length, progress=bar.update)
            settings.update(continuation_tokens=info["continuation_tokens"], single_token=info["single_token"])
            for row, lp, cut in zip(rows, scores, info["truncated"]):
                row.update(prediction=LETTERS[max(range(len(LETTERS)), key=lp.__getitem__)], logprobs=lp, truncated=cut)
        else:
            responses = generate_texts(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       progress=bar.update)
            for row, response in zip(rows, responses):
                row.update(response=response, prediction=extract_letter(response))
    for row in rows:
        row["correct"] = row["prediction"] == row["answer"]
    result = {"settings": settings, **aggregate(rows), "items": rows}
    result["truncated"] = sum(bool(r.get("truncated")) for r in rows)
    result["seconds"] = time.perf_counter() - started
    return result


def markdown_table(results: dict[str, dict]) -> str:
    """One row per evaluated model: accuracy per category, micro and macro average (Table 2 reports one accuracy)."""
    categories = [c for c in CATEGORIES + [UNCATEGORIZED] if any(c in r["categories"] for r in results.values())]
    rows = [[name, *[f"{r['categories'][c]['accuracy']:.2f}" if c in r["categories"] else "-" for c in categories],
             f"{r['micro_average']:.2f}", f"{r['macro_average']:.2f}"] for name, r in results.items()]
    return markdown.table(["model", *categories, "micro avg", "macro avg"], rows) + "\n"


@dataclass(frozen=True)
class Options:
    """``comlora eval --task mmlu``'s own options."""

    subjects: str | None = option(None, "Comma-separated MMLU subjects (default: all 57).")
    shots: int = option(0, "Dev-split examples per subject in the prompt (0 = zero-shot).")
    mmlu_mode: str = option("logits", "logits: compare the log-probabilities of ' A'..' D'; generate: generate and "
                            "take the first letter.", choices=MODES)
    prompt_style: str = option("harness", "harness: lm-evaluation-harness prompt; alpaca: the form of MMLU training "
                               "items.", choices=PROMPT_STYLES)


def prepare(settings: EvalSettings, options: Options, root: Path):
    """evaluate(model, tokenizer) on the test split (``--limit`` rows per subject), ``--shots`` dev examples each."""
    if settings.scoring != "generate":
        raise ValueError("--scoring applies to commonsense and convai2; MMLU scores by log-likelihood with --mmlu-mode "
                         "logits (its default)")
    if settings.backend == "llama.cpp" and options.mmlu_mode != "generate":
        raise ValueError("the llama.cpp backend scores MMLU by generation: add --mmlu-mode generate")
    subjects = options.subjects.split(",") if options.subjects else None
    items = load_mmlu(root, "test", subjects, settings.limit)
    dev = load_mmlu(root, "dev", subjects) if options.shots else None
    return lambda model, tok: evaluate_mmlu(model, tok, items, options.shots, dev, options.mmlu_mode,
                                            options.prompt_style, settings.batch_size, settings.max_new_tokens)

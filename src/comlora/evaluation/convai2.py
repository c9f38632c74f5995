"""ConvAI2 (docs/evaluation.md): ``generate``, replies scored by text_metrics (BLEU, METEOR, ROUGE-L, BERTScore);
``loglik``, the gold reply's negative log-likelihood (per-token NLL and perplexity)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from comlora import markdown
from comlora.data.convai2 import CONVAI2_FILE, SPLIT_NAMES, convai2_examples, load_convai2, split_dialogues
from comlora.data.items import format_prompt
from comlora.evaluation.generation import generate_texts
from comlora.evaluation.settings import EvalSettings, option
from comlora.evaluation.text_metrics import TABLE_METRICS, text_metrics


def first_line(text: str) -> str:
    """The reply a generation stands for: its first non-empty line, stripped (ConvAI2 replies are one line)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def evaluate_convai2(model, tokenizer, examples: list[dict], num_beams: int = 1, length_penalty: float = 1.0,
                     no_repeat_ngram_size: int = 0, max_new_tokens: int = 32, batch_size: int = 8,
                     bertscore: bool = True) -> dict:
    """Generate a reply after the Alpaca prompt of each example and score the replies against the gold
    responses with ``text_metrics`` (all metrics on 0-100); every item's generation is kept."""
    started = time.perf_counter()
    prompts = [format_prompt({"instruction": ex["prompt"], "input": ""}) for ex in examples]
    extra = {"length_penalty": length_penalty} if num_beams > 1 else {}
    if no_repeat_ngram_size:
        extra["no_repeat_ngram_size"] = no_repeat_ngram_size
    with tqdm(total=len(prompts), desc="convai2", dynamic_ncols=True) as bar:
        generations = generate_texts(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     num_beams=num_beams, progress=bar.update, **extra)
    predictions = [first_line(g) for g in generations]
    metrics = text_metrics(predictions, [ex["response"] for ex in examples], bertscore=bertscore)
    items = [{"dialogue": ex.get("dialogue"), "turn": ex.get("turn"), "response": ex["response"],
              "generation": g, "prediction": p} for ex, g, p in zip(examples, generations, predictions)]
    settings = {"scoring": "generate", "num_beams": num_beams, "length_penalty": length_penalty,
                "no_repeat_ngram_size": no_repeat_ngram_size, "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "bertscore": bertscore}
    return {"settings": settings, "n": len(items), "metrics": metrics, "items": items,
            "seconds": time.perf_counter() - started}


def response_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(context ids, response ids) as training tokenises an item (``data.tokenize_item``, no cutoff): the tokens of
    prompt + response after the first len(tok(prompt)), then EOS; so the scored tokens are the trained ones."""
    whole = tokenizer(prompt + response)["input_ids"]
    split = len(tokenizer(prompt)["input_ids"])
    return whole[:split], whole[split:] + [tokenizer.eos_token_id]


def evaluate_convai2_loglik(model, tokenizer, examples: list[dict], batch_size: int = 8) -> dict:
    """Per turn, the gold reply's summed NLL -sum_t log p(y_t | prompt, y_<t) over its ``tokens`` (EOS included)
    after the Alpaca prompt; ``nll_per_token`` = sum of NLLs / sum of tokens over the turns, ``perplexity`` = its
    exp."""
    from comlora.evaluation.loglik import continuation_logliks, pad_token_id  # imports torch
    started = time.perf_counter()
    prompts = [format_prompt({"instruction": ex["prompt"], "input": ""}) for ex in examples]
    pairs = [response_pair(tokenizer, prompt, ex["response"]) for prompt, ex in zip(prompts, examples)]
    with tqdm(total=len(pairs), desc="convai2 (loglik)", dynamic_ncols=True) as bar:
        logliks = continuation_logliks(model, [(context, [reply]) for context, reply in pairs], pad_token_id(tokenizer),
                                       batch_size, progress=bar.update)
    items = [{"dialogue": ex.get("dialogue"), "turn": ex.get("turn"), "prompt": prompt, "response": ex["response"],
              "nll": -loglik, "tokens": len(reply)}
             for ex, prompt, (_, reply), (loglik,) in zip(examples, prompts, pairs, logliks)]
    tokens = sum(item["tokens"] for item in items)
    nll_per_token = sum(item["nll"] for item in items) / tokens if tokens else float("nan")
    return {"settings": {"scoring": "loglik", "batch_size": batch_size}, "n": len(items),
            "metrics": {"nll_per_token": nll_per_token, "perplexity": math.exp(nll_per_token), "tokens": tokens},
            "items": items, "seconds": time.perf_counter() - started}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per evaluated model in the paper's Table 4 columns (0-100; '-' for a metric that could not run);
    with loglik scoring its per-token NLL (nats) and perplexity."""
    if next(iter(results.values()))["settings"].get("scoring") == "loglik":
        lines = ["| model | turns | tokens | NLL per token | perplexity |", "|---|---|---|---|---|"]
        for name, r in results.items():
            m = r["metrics"]
            lines.append(f"| {name} | {r['n']} | {m['tokens']} | {m['nll_per_token']:.4f} | {m['perplexity']:.2f} |")
        return "\n".join(lines) + "\n"
    names = {"bleu": "BLEU", "meteor": "METEOR", "rouge_l": "R-L", "bertscore_f1": "BERT F1", "bertscore_r": "BERT R",
             "bertscore_p": "BERT P", "average": "Average"}
    keys = list(TABLE_METRICS) + ["average"]
    rows = [[name, *["-" if r["metrics"][k] is None else f"{r['metrics'][k]:.2f}" for k in keys]]
            for name, r in results.items()]
    return markdown.table(["model", *[names[k] for k in keys]], rows) + "\n"


@dataclass(frozen=True)
class Options:
    """``comlora eval --task convai2``'s own options."""

    split: str = option("test", "Dialogue split to evaluate.", choices=SPLIT_NAMES)
    history_turns: int | None = option(None, "Earlier turn pairs in the prompt (default: all).")
    length_penalty: float = option(1.0, "Beam-search length penalty.")
    no_repeat_ngram_size: int = option(0, "Forbid repeating n-grams of this size (0 = off).")
    no_bertscore: bool = option(False, "Skip BERTScore (the slowest metric).")


def prepare(settings: EvalSettings, options: Options, root: Path):
    """evaluate(model, tokenizer) on every turn of the ``--split`` dialogues (the first ``--limit`` turns)."""
    dialogues = split_dialogues(load_convai2(root / CONVAI2_FILE), seed=settings.seed)[options.split]
    examples = convai2_examples(dialogues, options.history_turns)[:settings.limit]
    if settings.scoring == "loglik":
        return lambda model, tok: evaluate_convai2_loglik(model, tok, examples, settings.batch_size)
    return lambda model, tok: evaluate_convai2(model, tok, examples, settings.effective_num_beams,
                                               options.length_penalty, options.no_repeat_ngram_size,
                                               settings.max_new_tokens, settings.batch_size,
                                               bertscore=not options.no_bertscore)

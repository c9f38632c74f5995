"""ConvAI2 generation scored by text_metrics (BLEU, METEOR, ROUGE-L, BERTScore; docs/evaluation.md)."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from comlora import markdown
from comlora.data.convai2 import CONVAI2_FILE, SPLIT_NAMES, convai2_examples, load_convai2, split_dialogues
from comlora.data.items import format_prompt
from comlora.evaluation.generation import generate_texts
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
    settings = {"num_beams": num_beams, "length_penalty": length_penalty, "no_repeat_ngram_size": no_repeat_ngram_size,
                "max_new_tokens": max_new_tokens, "batch_size": batch_size, "bertscore": bertscore}
    return {"settings": settings, "n": len(items), "metrics": metrics, "items": items,
            "seconds": time.perf_counter() - started}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per evaluated model in the paper's Table 4 columns (0-100; '-' for a metric that could not run)."""
    names = {"bleu": "BLEU", "meteor": "METEOR", "rouge_l": "R-L", "bertscore_f1": "BERT F1", "bertscore_r": "BERT R",
             "bertscore_p": "BERT P", "average": "Average"}
    keys = list(TABLE_METRICS) + ["average"]
    rows = [[name, *["-" if r["metrics"][k] is None else f"{r['metrics'][k]:.2f}" for k in keys]]
            for name, r in results.items()]
    return markdown.table(["model", *[names[k] for k in keys]], rows) + "\n"


def add_arguments(group) -> None:
    """``comlora eval --task convai2`` options."""
    group.add_argument("--split", default="test", choices=SPLIT_NAMES, help="Dialogue split to evaluate.")
    group.add_argument("--history-turns", type=int, help="Earlier turn pairs in the prompt (default: all).")
    group.add_argument("--length-penalty", type=float, default=1.0, help="Beam-search length penalty.")
    group.add_argument("--no-repeat-ngram-size", type=int, default=0, help="Forbid repeating n-grams of this size (0 = off).")
    group.add_argument("--no-bertscore", action="store_true", help="Skip BERTScore (the slowest metric).")


def prepare(args, root: Path):
    """evaluate(model, tokenizer) on every turn of the ``--split`` dialogues (the first ``--limit`` turns)."""
    dialogues = split_dialogues(load_convai2(root / CONVAI2_FILE), seed=args.seed)[args.split]
    examples = convai2_examples(dialogues, args.history_turns)[:args.limit]
    return lambda model, tok: evaluate_convai2(model, tok, examples, 1 if args.greedy else args.num_beams,
                                               args.length_penalty, args.no_repeat_ngram_size, args.max_new_tokens,
                                               args.batch_size, bertscore=not args.no_bertscore)

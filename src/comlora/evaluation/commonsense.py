"""Commonsense evaluation (docs/evaluation.md). ``generate``: exactly as LLM-Adapters does it, generate after the
Alpaca prompt, take the text after the last '### Response:', and the first match of the task's keywords.
``loglik``: multiple choice as lm-evaluation-harness scores it, each option's text as the continuation of the
prompt."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from comlora import markdown
from comlora.data.commonsense import build_commonsense_mini
from comlora.data.items import format_prompt
from comlora.data.options import item_options
from comlora.evaluation.generation import generate_texts
from comlora.evaluation.settings import EvalSettings, option

ANSWER_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}


def extract_answer(task: str, response: str) -> str | None:
    """The first match of the task's keywords in the response (case-sensitive, as LLM-Adapters: 'True' is no
    answer, and a keyword inside a longer word such as 'untrue' still matches); None if there is none."""
    if task not in ANSWER_PATTERNS:
        raise ValueError(f"unknown commonsense task {task!r}; known tasks: {', '.join(ANSWER_PATTERNS)}")
    text = response.split("### Response:")[-1].strip()
    found = re.findall(ANSWER_PATTERNS[task], text)
    return found[0] if found else None


def evaluate_commonsense(model, tokenizer, evaluation: dict[str, list[dict]], limit: int | None = None,
                         batch_size: int = 8, max_new_tokens: int = 32, num_beams: int = 4) -> dict:
    """Accuracy per task and its average over tasks, with every item's response and prediction."""
    started = time.perf_counter()
    result = {"settings": {"scoring": "generate", "limit": limit, "batch_size": batch_size,
                           "max_new_tokens": max_new_tokens, "num_beams": num_beams}, "tasks": {}}
    total = sum(len(items[:limit]) for items in evaluation.values())
    with tqdm(total=total, desc="evaluate", dynamic_ncols=True) as bar:
        for task, items in evaluation.items():
            items = items[:limit]
            prompts = [format_prompt(item) for item in items]
            responses = generate_texts(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       num_beams=num_beams, progress=bar.update)
            rows = []
            for item, response in zip(items, responses):
                prediction = extract_answer(task, response)
                rows.append({"index": item.get("index"), "answer": item["answer"], "response": response,
                             "prediction": prediction, "correct": prediction == item["answer"]})
            accuracy = 100.0 * sum(r["correct"] for r in rows) / len(rows) if rows else 0.0
            result["tasks"][task] = {"accuracy": accuracy, "n": len(rows), "items": rows}
    accuracies = [t["accuracy"] for t in result["tasks"].values()]
    result["average"] = sum(accuracies) / len(accuracies) if accuracies else 0.0
    result["seconds"] = time.perf_counter() - started
    return result


MC_METRICS = ("acc", "acc_norm", "acc_bytes")
LOGLIK_PROMPTS = ("options", "cloze")


def evaluate_commonsense_loglik(model, tokenizer, evaluation: dict[str, list[dict]], limit: int | None = None,
                                batch_size: int = 8, prompt: str = "options") -> dict:
    """``acc``, ``acc_norm`` and ``acc_bytes`` (0-100, ``loglik.multiple_choice``) per task and averaged over tasks.
    Each item's context is its Alpaca prompt (``prompt`` options: the instruction as it is, listing the options,
    what ``answer_format: text`` trains on; cloze: the question alone, what ``answer_format: cloze`` trains on),
    each option's text a continuation split as ``loglik.encode_pair`` does; the items keep both strings and every
    option's loglik."""
    if prompt not in LOGLIK_PROMPTS:
        raise ValueError(f"prompt must be one of {', '.join(LOGLIK_PROMPTS)}, got {prompt!r}")
    from comlora.evaluation.loglik import continuation_logliks, encode_pair, multiple_choice, pad_token_id  # torch
    started = time.perf_counter()
    tasks = {task: items[:limit] for task, items in evaluation.items()}
    rows, groups = [], []
    for task, items in tasks.items():
        for item in items:
            options, answer = item_options(dict(item, task=task))
            context = format_prompt(item if prompt == "options" else dict(item, instruction=options.question))
            encoded = [encode_pair(tokenizer, context, text) for text in options.texts]
            groups.append((encoded[0][0], [continuation for _, continuation in encoded]))
            rows.append({"task": task, "index": item.get("index"), "answer": item["answer"], "answer_index": answer,
                         "prompt": context, "options": list(options.texts),
                         "option_tokens": [len(continuation) for _, continuation in encoded]})
    with tqdm(total=len(groups), desc="evaluate (loglik)", dynamic_ncols=True) as bar:
        logliks = continuation_logliks(model, groups, pad_token_id(tokenizer), batch_size, progress=bar.update)
    result = {"settings": {"scoring": "loglik", "prompt": prompt, "limit": limit, "batch_size": batch_size},
              "tasks": {}}
    for row, option_loglik in zip(rows, logliks):
        row["option_loglik"] = option_loglik
        row["prediction"] = multiple_choice(option_loglik, row["options"])
        row["correct"] = {metric: index == row["answer_index"] for metric, index in row["prediction"].items()}
    for task in tasks:
        task_rows = [{k: v for k, v in row.items() if k != "task"} for row in rows if row["task"] == task]
        scores = {m: 100.0 * sum(r["correct"][m] for r in task_rows) / len(task_rows) if task_rows else 0.0
                  for m in MC_METRICS}
        result["tasks"][task] = {**scores, "n": len(task_rows), "items": task_rows}
    for metric in MC_METRICS:
        values = [t[metric] for t in result["tasks"].values()]
        result[metric] = sum(values) / len(values) if values else 0.0
    result["seconds"] = time.perf_counter() - started
    return result


def markdown_table(results: dict[str, dict]) -> str:
    """One row per evaluated model: accuracy per task and the average (the paper's Table 3 columns); with loglik
    scoring one row per model and metric (acc, acc_norm)."""
    tasks = list(next(iter(results.values()))["tasks"])
    if next(iter(results.values()))["settings"].get("scoring") == "loglik":
        rows = [[name, metric, *[f"{result['tasks'][t][metric]:.1f}" for t in tasks], f"{result[metric]:.1f}"]
                for name, result in results.items() for metric in ("acc", "acc_norm")]
        return markdown.table(["model", "metric", *tasks, "avg"], rows) + "\n"
    rows = [[name, *[f"{result['tasks'][t]['accuracy']:.1f}" for t in tasks], f"{result['average']:.1f}"]
            for name, result in results.items()]
    return markdown.table(["model", *tasks, "avg"], rows) + "\n"


@dataclass(frozen=True)
class Options:
    """``comlora eval --task commonsense``'s own options."""

    tasks: str | None = option(None, "Comma-separated commonsense tasks (default: all 8).")
    eval_size: int | None = option(None, "Reserved evaluation items per task (default: the run's, else 100).")
    prompt: str | None = option(None, "--scoring loglik: the context of the options, 'options' (the instruction "
                                "listing them, what answer_format text trains on) or 'cloze' (the question alone, as "
                                "lm-evaluation-harness prompts; what answer_format cloze trains on); default: cloze "
                                "for a run trained with answer_format cloze, else options.", choices=LOGLIK_PROMPTS)


def prepare(settings: EvalSettings, options: Options, root: Path):
    """evaluate(model, tokenizer) on the reserved evaluation items of commonsense-mini (a run's own held-out items:
    the same data seed and no larger eval_size, else its training items could be among them)."""
    run = settings.run_config
    eval_size = options.eval_size if options.eval_size is not None else run.eval_size if run is not None else 100
    if settings.limit is not None and settings.limit > eval_size:
        raise ValueError(f"--limit {settings.limit} exceeds --eval-size {eval_size} (the reserved subset)")
    tasks = options.tasks.split(",") if options.tasks else None
    suite = build_commonsense_mini(root, tasks, eval_size=eval_size, train_per_task=0, val_size=0, seed=settings.seed)
    trained_on_suite = run is not None and run.data == "commonsense-mini"
    if trained_on_suite and (settings.seed != run.split_seed or eval_size > run.eval_size):
        raise ValueError(f"--seed {settings.seed} / --eval-size {eval_size} differ from the run's (data seed "
                         f"{run.split_seed}, eval_size {run.eval_size}): the evaluation items could overlap its "
                         f"training items")
    if settings.scoring == "loglik":
        prompt = options.prompt or ("cloze" if run is not None and run.answer_format == "cloze" else "options")
        return lambda model, tok: evaluate_commonsense_loglik(model, tok, suite.evaluation, settings.limit,
                                                              settings.batch_size, prompt)
    if options.prompt is not None:
        raise ValueError("--prompt applies to --scoring loglik (generation prompts with the instruction as it is)")
    return lambda model, tok: evaluate_commonsense(model, tok, suite.evaluation, settings.limit, settings.batch_size,
                                                   settings.max_new_tokens, settings.effective_num_beams)

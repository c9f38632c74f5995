"""Commonsense evaluation exactly as LLM-Adapters does it (docs/evaluation.md): generate after the Alpaca
prompt, take the text after the last '### Response:', and the first match of the task's keywords."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tqdm.auto import tqdm

from comlora import markdown
from comlora.data.commonsense import build_commonsense_mini
from comlora.data.items import format_prompt
from comlora.evaluation.generation import generate_texts

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
    result = {"settings": {"limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                           "num_beams": num_beams}, "tasks": {}}
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


def markdown_table(results: dict[str, dict]) -> str:
    """One row per evaluated model: accuracy per task and the average (the paper's Table 3 columns)."""
    tasks = list(next(iter(results.values()))["tasks"])
    rows = [[name, *[f"{result['tasks'][t]['accuracy']:.1f}" for t in tasks], f"{result['average']:.1f}"]
            for name, result in results.items()]
    return markdown.table(["model", *tasks, "avg"], rows) + "\n"


def add_arguments(group) -> None:
    """``comlora eval --task commonsense`` options."""
    group.add_argument("--tasks", help="Comma-separated commonsense tasks (default: all 8).")
    group.add_argument("--eval-size", type=int, help="Reserved evaluation items per task (default: the run's, else 100).")


def prepare(args, root: Path):
    """evaluate(model, tokenizer) on the reserved evaluation items of commonsense-mini (a run's own held-out items:
    the same data seed and no larger eval_size, else its training items could be among them)."""
    if args.limit is not None and args.limit > args.eval_size:
        raise ValueError(f"--limit {args.limit} exceeds --eval-size {args.eval_size} (the reserved subset)")
    tasks = args.tasks.split(",") if args.tasks else None
    suite = build_commonsense_mini(root, tasks, eval_size=args.eval_size, train_per_task=0, val_size=0, seed=args.seed)
    run = args.run_config
    if run is not None and run.data == "commonsense-mini" and (args.seed != run.split_seed or args.eval_size > run.eval_size):
        raise ValueError(f"--seed {args.seed} / --eval-size {args.eval_size} differ from the run's (data seed {run.split_seed}, "
                         f"eval_size {run.eval_size}): the evaluation items could overlap its training items")
    return lambda model, tok: evaluate_commonsense(model, tok, suite.evaluation, args.limit, args.batch_size,
                                                   args.max_new_tokens, 1 if args.greedy else args.num_beams)

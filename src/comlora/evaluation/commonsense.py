"""Commonsense evaluation exactly as LLM-Adapters does it (spec section 9): generate after the Alpaca
prompt, take the text after the last '### Response:', and the first match of the task's keywords."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tqdm.auto import tqdm

from comlora.data.items import format_prompt
from comlora.evaluation.generation import generate_texts
from comlora.storage import write_json, write_text

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
    lines = ["| model | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    for name, result in results.items():
        cells = [f"{result['tasks'][t]['accuracy']:.1f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['average']:.1f} |")
    return "\n".join(lines) + "\n"


def write_results(out: str | Path, name: str, result: dict, table=markdown_table) -> Path:
    """``<out>/<name>.json`` (settings, per-item predictions, metrics) and ``<out>/<name>.md`` (``table``)."""
    out = Path(out)
    write_json(out / f"{name}.json", result)
    write_text(out / f"{name}.md", table({name: result}))
    return out / f"{name}.json"

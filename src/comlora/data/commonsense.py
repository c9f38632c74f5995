"""The deterministic "commonsense-mini" suite: training, validation and evaluation items of the 8 commonsense
tasks (LLM-Adapters' dataset folder under the data root), disjoint by construction."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from comlora.data.items import load_items

COMMONSENSE_TASKS = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy",
                     "openbookqa"]


@dataclass
class CommonsenseMini:
    """Training items, validation items and per-task evaluation subsets, all disjoint (see ``build``)."""

    train: list[dict]
    validation: list[dict]
    evaluation: dict[str, list[dict]]


def _task_files(root: Path, task: str) -> tuple[Path | None, Path]:
    folder = root / "commonsense" / task
    if task not in COMMONSENSE_TASKS:
        raise ValueError(f"unknown commonsense task {task!r}; known tasks: {', '.join(COMMONSENSE_TASKS)}")
    train = folder / "train.json"
    return (train if train.is_file() else None), folder / "test.json"


def build_commonsense_mini(root: str | Path, tasks: list[str] | None = None, eval_size: int = 100,
                           train_per_task: int = 25, val_size: int = 120, seed: int = 0) -> CommonsenseMini:
    """The "commonsense-mini" suite, deterministic given its arguments.

    Per task: the evaluation subset is ``eval_size`` items of test.json drawn with a seeded RNG (it
    depends only on ``seed`` and the task, so runs with other training sizes evaluate on the same
    items). Training candidates are train.json where it exists, otherwise the test.json items outside
    the evaluation subset. ``train_per_task`` candidates per task are drawn for training, and
    ``val_size`` validation items are drawn from the pooled remaining candidates (the paper holds
    out 120 entries of the pooled training set). Evaluation, training and validation never overlap.
    """
    root = Path(root)
    tasks = tasks or list(COMMONSENSE_TASKS)
    train, spare, evaluation = [], [], {}
    for task in tasks:
        train_file, test_file = _task_files(root, task)
        test = load_items(test_file, require_answer=True)
        order = list(range(len(test)))
        random.Random(f"{seed}:{task}:eval").shuffle(order)
        evaluation[task] = [dict(test[i], task=task, index=i) for i in order[:eval_size]]
        if train_file is not None:
            candidates = [dict(item, task=task, index=i, source="train")
                          for i, item in enumerate(load_items(train_file))]
        else:
            candidates = [dict(test[i], task=task, index=i, source="test") for i in order[eval_size:]]
        random.Random(f"{seed}:{task}:train").shuffle(candidates)
        train.extend(candidates[:train_per_task])
        spare.extend(candidates[train_per_task:])
    random.Random(f"{seed}:validation").shuffle(spare)
    if val_size > len(spare):
        raise ValueError(f"val_size={val_size} exceeds the {len(spare)} items left for validation")
    random.Random(f"{seed}:train-order").shuffle(train)
    return CommonsenseMini(train=train, validation=spare[:val_size], evaluation=evaluation)

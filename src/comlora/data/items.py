"""LLM-Adapters JSON items, the data root, the Alpaca prompt, tokenisation with label masking, and padding into
batches."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100      # the label of a token that is not a target (prompt, padding)

PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def data_root(override: str | Path | None = None) -> Path:
    """``override``, else ``$COMLORA_DATA``, else ``../shared/data`` beside the repository (or the working
    directory)."""
    if override is None:
        override = os.environ.get("COMLORA_DATA")
    if override is not None:
        root = Path(override)
        if not root.is_dir():
            raise FileNotFoundError(f"data root {root} is not a folder")
        return root
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    for root in candidates:
        if root.is_dir():
            return root
    raise FileNotFoundError(f"no data root found (looked in {', '.join(map(str, candidates))}); "
                            "set COMLORA_DATA or pass --data-root")


def load_items(path: str | Path, require_answer: bool = False) -> list[dict]:
    """Items of one LLM-Adapters JSON file (a list of {instruction, input, output, answer}) or of every
    ``*.json`` below a folder; every problem names the file, the item index and the field."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.json"))
        if not files:
            raise ValueError(f"{path}: folder holds no .json file")
        return [item for f in files for item in load_items(f, require_answer)]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file or folder")
    try:
        items = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of items, got {type(items).__name__}")
    if not items:
        raise ValueError(f"{path}: the file holds no item")
    required = ["instruction", "output"] + (["answer"] if require_answer else [])
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: item {i} is a {type(item).__name__}, expected an object")
        for key in required:
            if key not in item:
                raise ValueError(f"{path}: item {i} has no field {key!r}")
        for key in ("instruction", "input", "output", "answer"):
            if key in item and not isinstance(item[key], str):
                raise ValueError(f"{path}: item {i} field {key!r} must be a string, got {type(item[key]).__name__}")
    return items


def format_prompt(item: dict) -> str:
    """The Alpaca prompt of LLM-Adapters, up to and including '### Response:\\n'."""
    if item.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=item["instruction"], input=item["input"])
    return PROMPT_NO_INPUT.format(instruction=item["instruction"])


def tokenize_item(tokenizer, item: dict, cutoff_len: int, train_on_inputs: bool = False) -> dict:
    """LLM-Adapters' tokenisation: prompt + output truncated to ``cutoff_len``, EOS appended when it fits,
    labels = input_ids with the prompt tokens set to -100 unless ``train_on_inputs``."""
    prompt = format_prompt(item)
    ids = tokenizer(prompt + item["output"], truncation=True, max_length=cutoff_len,
                    add_special_tokens=True)["input_ids"]
    if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
        ids = ids + [tokenizer.eos_token_id]
    labels = list(ids)
    if not train_on_inputs:
        prompt_len = len(tokenizer(prompt, truncation=True, max_length=cutoff_len,
                                   add_special_tokens=True)["input_ids"])
        labels[:prompt_len] = [IGNORE_INDEX] * min(prompt_len, len(labels))
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets attention 0 and label -100."""
    import torch  # here, not at the top: the command line's options load this module

    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = length - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        batch["labels"].append(e["labels"] + [IGNORE_INDEX] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

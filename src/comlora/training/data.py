"""The training and validation items of a run's ``data`` option, tokenised with their targets."""

from __future__ import annotations

import sys
from pathlib import Path

from comlora.data.commonsense import build_commonsense_mini
from comlora.data.convai2 import CONVAI2_FILE, convai2_training_items, load_convai2, split_dialogues
from comlora.data.items import IGNORE_INDEX, data_root, load_items, tokenize_item
from comlora.data.mmlu import mmlu_training_items
from comlora.data.options import cloze_item, text_answer_item
from comlora.training.config import TrainConfig

ROOT_DATA = ("commonsense-mini", "convai2", "mmlu", "mmlu:dev", "mmlu:test")    # read from the data root


def check_data_source(cfg: TrainConfig) -> None:
    """The data root, file or folder ``cfg.data`` reads exists: a missing one is an error in a moment, before the
    training stack and the model load (``training_items`` reads and checks the content)."""
    if cfg.data in ROOT_DATA:
        data_root(cfg.data_root)
        return
    path = Path(cfg.data.removeprefix("mmlu:"))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file or folder")


def training_items(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(training items, validation items) of ``cfg.data`` (``data_items``), answered as ``cfg.answer_format`` says."""
    train, validation = data_items(cfg)
    return with_answer_format(train, cfg), with_answer_format(validation, cfg)


def with_answer_format(items: list[dict], cfg: TrainConfig) -> list[dict]:
    """``items`` as they are (``answer_format`` label), answered by their correct option's text (text), or by that
    text after the question alone (cloze)."""
    if cfg.answer_format == "label":
        return items
    return [(text_answer_item if cfg.answer_format == "text" else cloze_item)(item) for item in items]


def data_items(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(training items, validation items) of ``cfg.data``:

    - ``commonsense-mini``: the suite of ``data.build_commonsense_mini``;
    - ``mmlu`` / ``mmlu:dev`` / ``mmlu:test`` / ``mmlu:FOLDER``: MMLU CSVs as LLM-Adapters items (default: the
      dev split), ``val_size`` of them held out at random;
    - ``convai2``: turns of the dialogues of the train split, validation turns from the validation split
      (``convai2.split_dialogues``, by dialogue);
    - a LLM-Adapters JSON file or folder, ``val_size`` items held out at random.

    ``train_size`` > 0 keeps that many training items, drawn at random with the data seed (``subset``).
    """
    train, validation = _training_items(cfg)
    return subset(train, cfg.train_size, cfg.split_seed, cfg.data), validation


def subset(items: list[dict], size: int, seed: int, source: str) -> list[dict]:
    """``size`` of ``items`` drawn without replacement by a permutation seeded with ``seed``, in their original
    order (all of them for ``size`` 0)."""
    if not size:
        return items
    if size > len(items):
        raise ValueError(f"{source}: train_size={size} but only {len(items)} training items are available")
    import torch

    keep = sorted(torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:size].tolist())
    return [items[i] for i in keep]


def _training_items(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    root = lambda: data_root(cfg.data_root)  # noqa: E731
    if cfg.data == "commonsense-mini":
        suite = build_commonsense_mini(root(), cfg.tasks, cfg.eval_size, cfg.train_per_task, cfg.val_size,
                                       cfg.split_seed)
        return suite.train, suite.validation
    if cfg.data == "convai2":
        splits = split_dialogues(load_convai2(root() / CONVAI2_FILE), seed=cfg.split_seed)
        return (convai2_training_items(splits["train"], cfg.history_turns),
                convai2_training_items(splits["validation"], cfg.history_turns)[:cfg.val_size])
    if cfg.data == "mmlu" or cfg.data.startswith("mmlu:"):
        source = cfg.data.partition(":")[2] or "dev"
        items = mmlu_training_items(root(), source) if source in ("dev", "test") else mmlu_training_items(source)
    else:
        items = load_items(cfg.data)
    if cfg.val_size >= len(items):
        raise ValueError(f"{cfg.data}: {len(items)} items cannot hold out val_size={cfg.val_size} for validation")
    import torch  # here, not at the top: the command line checks the data before torch loads

    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.split_seed)).tolist()
    return [items[i] for i in order[cfg.val_size:]], [items[i] for i in order[:cfg.val_size]]


def load_training_data(cfg: TrainConfig, tokenizer, items: tuple[list[dict], list[dict]] | None = None
                       ) -> tuple[list[dict], list[dict]]:
    """Tokenised (training, validation) examples of ``cfg.data`` (``items``: what ``training_items`` returned, when
    the data was read before the model was loaded)."""
    train_items, val_items = training_items(cfg) if items is None else items
    return tokenize_with_targets(train_items, "training", cfg, tokenizer), \
        tokenize_with_targets(val_items, "validation", cfg, tokenizer)


def tokenize_with_targets(items: list[dict], split: str, cfg: TrainConfig, tokenizer) -> list[dict]:
    """Tokenised items, leaving out (and reporting) those whose prompt fills cutoff_len: no target token left."""
    examples = [tokenize_item(tokenizer, item, cfg.cutoff_len, cfg.train_on_inputs) for item in items]
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"][1:])]
    if len(kept) < len(examples):
        print(f"note: {len(examples) - len(kept)} of {len(examples)} {split} items have no response token within "
              f"cutoff_len={cfg.cutoff_len} and are left out", file=sys.stderr)
    if not kept:
        raise ValueError(f"no {split} item has a response token within cutoff_len={cfg.cutoff_len}")
    return kept

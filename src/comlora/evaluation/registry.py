"""The evaluation registry: task name -> its module. A task module has ``add_arguments(group)`` (its own
``comlora eval`` options), ``prepare(args, data_root) -> evaluate(model, tokenizer) -> result`` and
``markdown_table(results)``. A new evaluation is one module plus one line in ``TASKS``."""

from __future__ import annotations

from types import ModuleType

from comlora.evaluation import commonsense, convai2, mmlu

TASKS: dict[str, ModuleType] = {
    "commonsense": commonsense,       # the 8 commonsense tasks, LLM-Adapters' answer extraction (Table 3)
    "mmlu": mmlu,                     # MMLU by log-probabilities or generation (Table 2)
    "convai2": convai2,               # ConvAI2 replies scored by BLEU, METEOR, ROUGE-L, BERTScore (Table 4)
}

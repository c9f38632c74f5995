"""The evaluation registry: task name -> its module. A task module has

- ``Options``: a dataclass of its own ``comlora eval`` options, each field made with ``settings.option`` (a flag
  ``--name-with-hyphens`` in the task's group of ``comlora eval --help``; flag names are unique across tasks);
- ``prepare(settings, options, data_root) -> evaluate(model, tokenizer) -> result``: ``settings`` is the
  ``settings.EvalSettings`` every task shares (run, model, seed, limit, scoring, batch size, generation, ...;
  ``with_run_defaults`` applied), ``options`` its ``Options``; ``result["settings"]`` records how it evaluated;
- ``markdown_table(results)``.

A new evaluation is one module plus one line in ``TASKS``."""

from __future__ import annotations

from types import ModuleType

from comlora.evaluation import commonsense, convai2, mmlu

TASKS: dict[str, ModuleType] = {
    "commonsense": commonsense,       # the 8 commonsense tasks, LLM-Adapters' answer extraction (Table 3)
    "mmlu": mmlu,                     # MMLU by log-probabilities or generation (Table 2)
    "convai2": convai2,               # ConvAI2 replies scored by BLEU, METEOR, ROUGE-L, BERTScore (Table 4)
}

"""Data: ``items`` (LLM-Adapters items, the data root, prompts, tokenisation, batches), ``commonsense``
(commonsense-mini), ``mmlu``, ``convai2``."""

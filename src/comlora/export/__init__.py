"""Exports of a finished run: ``run`` (PEFT adapter or merged transformers folder), ``gguf`` (llama.cpp adapter or
merged GGUF model); ``comlora.provenance`` records which base weights a run was trained on in every export."""

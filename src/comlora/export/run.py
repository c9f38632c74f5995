"""``comlora export`` in the PEFT formats: a run's winner (or component k) as a PEFT adapter folder, or merged into the
base weights as a transformers model folder; the other methods' saved state, or their merged model where they merge."""

from __future__ import annotations

from pathlib import Path

from comlora.base_models import without_transformers_bars
from comlora.provenance import base_model_record, write_model_card
from comlora.quantization import quantization_record
from comlora.methods.comlora.model import ComLoraModel
from comlora.training.runs import reload_method


def export_run(run: str | Path, out: Path, component: int | None = None, merge: bool = False) -> str:
    """Write the export into the folder ``out`` (with a model card naming the base weights); returns what was exported."""
    method, tokenizer, cfg = reload_method(run)
    record = base_model_record(cfg.model, quantization_record(method.model))    # before a merge dequantizes it
    if isinstance(method, ComLoraModel):
        component = method.resolve_component(component)
        if merge:
            merged = method.merge(component, inplace=True)
            with without_transformers_bars():
                merged.save_pretrained(out)
            tokenizer.save_pretrained(out)
        else:
            method.export_adapter(out, component)
        write_model_card(out, record, "transformers" if merge else "peft")
        return f"exported component {component}{' merged' if merge else ''}"
    if component not in (None, 0):
        raise ValueError(f"a {cfg.method} run has no components to choose from")
    if merge:
        if not method.mergeable:
            raise ValueError(f"{cfg.method} cannot be merged into the base weights")
        if cfg.load_in_4bit or cfg.load_in_8bit:
            raise ValueError(f"merging a {cfg.method} run trained on a quantized base is not supported (PEFT "
                             "would re-quantize the merged weights); export the adapter and merge it with PEFT onto "
                             "the full-precision base")
        merged = method.peft_model.merge_and_unload()
        with without_transformers_bars():
            merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    else:
        method.save(out)
    write_model_card(out, record, "transformers" if merge else "peft")
    return f"exported {cfg.method}{' merged' if merge else ''}"

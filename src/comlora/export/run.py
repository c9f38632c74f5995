"""``comlora export`` in the PEFT formats: a run's winner (or component k) as an adapter folder (``export_adapter``:
a PEFT adapter where the method has that form, else its saved state), or merged into the base weights as a
transformers model folder (``merge``, for a mergeable method)."""

from __future__ import annotations

import shutil
from pathlib import Path

from comlora.base_models import without_transformers_bars
from comlora.provenance import base_model_record, write_model_card
from comlora.quantization import quantization_record
from comlora.training.finished_run import reload_method
from comlora.training.safe_run_dir import commit_folder, new_temp_folder


def export_run(run: str | Path, out: Path, component: int | None = None, merge: bool = False) -> str:
    """Write the export into the folder ``out`` (with a model card naming the base weights); returns what was
    exported."""
    method, tokenizer, cfg = reload_method(run)
    record = base_model_record(cfg.model, quantization_record(method.model))    # before a merge dequantizes it
    component = method.resolve_component(component)
    if merge:
        if not method.mergeable:
            raise ValueError(f"{cfg.method} cannot be merged into the base weights")
        merged = method.merge(component, inplace=True)
        with without_transformers_bars():
            merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    else:
        method.export_adapter(out, component)
    write_model_card(out, record, "transformers" if merge else "peft")
    exported = cfg.method if component is None else f"component {component}"
    return f"exported {exported}{' merged' if merge else ''}"


def export_folder(run: str | Path, out: str | Path, component: int | None = None, merge: bool = False,
                  outtype: str | None = None) -> str:
    """``comlora export --format peft``: ``export_run`` into a new (or empty) folder ``out``, written whole in a
    temporary folder and then renamed."""
    if outtype is not None:
        raise ValueError("--outtype applies to --format gguf")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; choose a new folder (nothing was written)")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new --out (nothing was written)")
    tmp = new_temp_folder(out)
    try:
        done = export_run(run, tmp, component, merge)
        commit_folder(tmp, out, replace=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return f"{done} -> {out}"

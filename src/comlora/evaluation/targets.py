"""The models one ``comlora eval`` evaluates: each chosen component of a run (the method's ``component_indices`` and
``use_component`` hooks; a method without components is one target), a PEFT adapter on its base, or the base model;
through transformers, or through llama.cpp with ``--backend llama.cpp``."""

from __future__ import annotations

from pathlib import Path

from comlora.evaluation.results import component_label
from comlora.evaluation.settings import EvalSettings


def target_label(run_name: str, method, component: int | None) -> str:
    """What the results of ``component`` of a run are called: the run's name, with the component (and whether it is
    the winner) for a method with components (``results.component_label``)."""
    return run_name if component is None else component_label(run_name, component, component == method.winner)


def evaluation_targets(settings: EvalSettings):
    """Yield (label, model, tokenizer) for every model the eval command names."""
    from comlora.base_models import load_model_and_tokenizer
    from comlora.training.finished_run import reload_method

    if settings.backend == "llama.cpp":
        yield from llama_cpp_targets(settings)
        return
    if settings.run:
        method, tokenizer, _ = reload_method(settings.run, device=settings.device)
        name = Path(settings.run).name
        for k in method.component_indices(settings.components):
            with method.use_component(k):
                yield target_label(name, method, k), method, tokenizer
        return
    if settings.adapter and not Path(settings.adapter).is_dir():          # before the model loads
        raise FileNotFoundError(f"--adapter {settings.adapter}: no such folder (a PEFT adapter folder)")
    model, tokenizer = load_model_and_tokenizer(settings.model, device=settings.device)
    if settings.adapter:
        from comlora.methods.saved_state import load_peft_adapter

        yield Path(settings.adapter).name, load_peft_adapter(model, settings.adapter).eval(), tokenizer
    else:
        yield f"base-{Path(settings.model).name}", model.eval(), tokenizer


def llama_cpp_targets(settings: EvalSettings):
    """Yield (label, LlamaCppGenerator, None) for ``--backend llama.cpp``: a run's components or LoRA through a
    GGUF adapter on its base GGUF, or ``--model`` (the default or a .gguf file) with an optional GGUF ``--adapter``."""
    from comlora.evaluation.llama_cpp import LlamaCppGenerator, gguf_model_path, run_generator
    from comlora.training.finished_run import reload_method

    if settings.run:
        method, _, cfg = reload_method(settings.run, device="cpu")
        name = Path(settings.run).name
        for k in method.component_indices(settings.components):
            label = target_label(name, method, k) + "-llama.cpp"
            yield from freed_after_use(label, run_generator(method, cfg.model, k))
        return
    if settings.adapter and Path(settings.adapter).suffix != ".gguf":
        raise ValueError(f"--backend llama.cpp takes a GGUF adapter file (comlora export RUN --format gguf), "
                         f"not {settings.adapter}")
    label = Path(settings.adapter).stem if settings.adapter else f"base-{Path(settings.model).name}"
    yield from freed_after_use(f"{label}-llama.cpp",
                               LlamaCppGenerator(gguf_model_path(settings.model), settings.adapter))


def freed_after_use(label: str, generator):
    """Yield one llama.cpp target; free its model once the caller is done with it."""
    yield label, generator, None
    generator.close()

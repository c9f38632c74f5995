"""Checking a saved method state or PEFT adapter against a base model before anything is allocated.

The tensors a saved config asks for are built on the meta device (shapes, no memory) on a twin of the base
model's architecture, and compared with the names and shapes in the safetensors header (read without
loading a tensor). A config that disagrees with its weights, names other modules, or asks for huge tensors
is refused with one line naming the file, before a byte of it is allocated.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from comlora.storage import read_json_object, safetensors_shapes, state_fit_problems, summarize

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def meta_twin(model: nn.Module) -> nn.Module | None:
    """A model of ``model``'s class and config on the meta device (same module names and shapes, no memory);
    None for a model that is not a transformers model (no ``config``)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "config_class"):
        return None
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return type(model)(copy.deepcopy(config))


def config_from_file(config_class, values, file: Path):
    """``config_class.from_dict(values)``; a bad value is a ValueError naming ``file``."""
    if not isinstance(values, dict):
        raise ValueError(f"{file}: the config must be a JSON object, got {type(values).__name__}")
    try:
        return config_class.from_dict(values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{file}: {err}") from err


def check_weights_fit(build, model: nn.Module, weights_file: Path, config_file: Path) -> None:
    """Refuse ``weights_file`` unless its tensors are exactly those ``build(twin).state_tensors()`` creates on a meta
    twin of ``model`` (names and shapes). ``build`` is how the saved config rebuilds the method on a model."""
    saved = safetensors_shapes(weights_file)
    twin = meta_twin(model)
    if twin is None:         # not a transformers model: load_state_tensors still checks, after allocating
        return
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            expected = {k: list(v.shape) for k, v in build(twin).state_tensors().items()}
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from err
    problems = state_fit_problems(expected, saved)
    if problems:
        raise ValueError(f"{weights_file} does not fit {config_file.name} on this base model (saved from another "
                         f"model, or a file was edited or replaced): {summarize(problems)}")


def load_peft_adapter(model: nn.Module, path: str | Path, is_trainable: bool = False):
    """``PeftModel.from_pretrained(model, path)`` once the adapter's config and weights agree with each other and
    with ``model``: every weight PEFT would create is in the file with its shape, and nothing else. PEFT itself
    only warns about missing keys (and keeps their random initialisation) and fails on a shape mid-load."""
    from comlora.peft_import import peft, peft_quietly

    path = Path(path)
    config_file, weights_file = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder: {PEFT_CONFIG} is missing")
    if not weights_file.is_file():
        pickled = (" (adapter_model.bin is a pickle, which comlora does not load)"
                   if (path / "adapter_model.bin").exists() else "")
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder: {PEFT_WEIGHTS} is missing{pickled}")
    read_json_object(config_file, "peft_type")
    try:
        config = peft.PeftConfig.from_pretrained(str(path))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{config_file}: not a valid PEFT config ({err})") from err
    saved = safetensors_shapes(weights_file)
    twin = meta_twin(model)
    if twin is not None:
        try:
            with warnings.catch_warnings(), torch.device("meta"), peft_quietly():
                warnings.simplefilter("ignore")
                state = peft.get_peft_model_state_dict(peft.get_peft_model(twin, copy.deepcopy(config)))
        except ValueError as err:
            raise ValueError(f"{config_file}: {err}") from err
        problems = state_fit_problems({k: list(v.shape) for k, v in state.items()}, saved)
        if problems:
            raise ValueError(f"{weights_file} does not fit {PEFT_CONFIG} on this base model (an adapter of another "
                             f"model, or its r / target_modules were edited): {summarize(problems)}")
    with peft_quietly():
        return peft.PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable)

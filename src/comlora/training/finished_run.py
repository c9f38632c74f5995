"""A finished run reloaded: its TrainConfig, its method model on a fresh base, its validation batches."""

from __future__ import annotations

from pathlib import Path

from comlora.base_models import load_model_and_tokenizer
from comlora.data.items import load_items
from comlora.methods.registry import load_method
from comlora.training.batches import validation_batches
from comlora.training.config import EARLIER_RUN_VALUES, TrainConfig, load_yaml
from comlora.training.data import tokenize_with_targets, training_items, with_answer_format
from comlora.training.safe_run_dir import require_complete


def reload_method(run: str | Path, device: str | None = None):
    """(method model, tokenizer, TrainConfig) of a finished run, on a freshly loaded base model."""
    run = Path(run)
    cfg = run_config(run)
    require_complete(run)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device=device or cfg.device, dtype=cfg.dtype,
                                                load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit)
    return load_method(cfg, model, run / "state").eval(), tokenizer, cfg


def run_config(run: Path) -> TrainConfig:
    """The TrainConfig of a run directory (an option its config.yaml predates: what the run trained with,
    ``EARLIER_RUN_VALUES``); a missing, corrupt or invalid config.yaml is an error naming it."""
    config_file = Path(run) / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run} is not a run directory (config.yaml is missing)")
    try:
        return TrainConfig.from_dict({**EARLIER_RUN_VALUES, **load_yaml(config_file)})
    except TypeError as err:
        raise ValueError(f"{config_file}: {err}") from err
    except ValueError as err:
        raise ValueError(str(err) if str(config_file) in str(err) else f"{config_file}: {err}") from err


def run_validation_items(cfg: TrainConfig, data: str | None = None) -> list[dict]:
    """The validation items of a run (or the items of another LLM-Adapters file/folder given as ``data``)."""
    return training_items(cfg)[1] if data is None else with_answer_format(load_items(data), cfg)


def run_validation_batches(cfg: TrainConfig, items: list[dict], tokenizer, device):
    """``run_validation_items`` tokenised as the run's validation batches."""
    val_examples = tokenize_with_targets(items, "validation", cfg, tokenizer)
    return list(validation_batches(val_examples, cfg.batch_size, tokenizer.pad_token_id, device))

"""Experiment trackers for ``comlora train --report-to``: Accelerate's trackers (tensorboard, wandb, ...) get what
metrics.jsonl gets, as flat scalars, and the run's config as hyper-parameters."""

from __future__ import annotations

from pathlib import Path

TRACKER_DIR = "trackers"           # RUN_DIR/trackers/<project> holds file-based trackers' logs (tensorboard)
TRACKER_PROJECT = "comlora"


def tracker_logging_dir(run: str | Path) -> str:
    return str(Path(run) / TRACKER_DIR)


def tracker_values(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as scalars: every loss part, eta, the lowest-loss component, lr, ...;
    a list (each component's loss) becomes one scalar per index, ``component_loss/0`` ..."""
    values = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, (list, tuple)):
            values.update({f"{key}/{i}": float(v) for i, v in enumerate(value)})
        elif isinstance(value, (int, float)):
            values[key] = float(value)
    return values


def tracker_config(config: dict) -> dict:
    """The run's config as hyper-parameters trackers accept: numbers, strings and booleans (others as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}

"""Result files of every evaluation: ``<name>.json`` (settings, every item's prediction, metrics) and ``<name>.md``."""

from __future__ import annotations

from pathlib import Path

from comlora.storage import write_json, write_text


def write_results(out: str | Path, name: str, result: dict, table) -> Path:
    """``<out>/<name>.json`` (settings, per-item predictions, metrics) and ``<out>/<name>.md`` (``table``)."""
    out = Path(out)
    write_json(out / f"{name}.json", result)
    write_text(out / f"{name}.md", table({name: result}))
    return out / f"{name}.json"

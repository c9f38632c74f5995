"""Result files of every evaluation: ``<name>.json`` (settings, every item's prediction, metrics) and ``<name>.md``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from comlora.storage import write_json, write_text

COMPONENT_LABEL = re.compile(r"-component(\d+)(-winner)?")


class ComponentName(NamedTuple):
    """The component a result file holds, as its name says (parse_component_label)."""

    component: int
    winner: bool


def component_label(run: str, component: int, winner: bool) -> str:
    """What component ``component`` of run ``run`` is called in its result files' names (``<task>-<label>.json``):
    ``<run>-component<k>``, and ``-winner`` after it for the run's winner."""
    return f"{run}-component{component}" + ("-winner" if winner else "")


def parse_component_label(name: str) -> ComponentName | None:
    """The component a result file's name (or label) holds, as component_label wrote it; None when the name has no
    component (a base model, an adapter, a method without components)."""
    found = [*COMPONENT_LABEL.finditer(name)]           # the last: a run's own name may hold "-component"
    return ComponentName(int(found[-1].group(1)), found[-1].group(2) is not None) if found else None


def write_results(out: str | Path, name: str, result: dict, table) -> Path:
    """``<out>/<name>.json`` (settings, per-item predictions, metrics) and ``<out>/<name>.md`` (``table``)."""
    out = Path(out)
    write_json(out / f"{name}.json", result)
    write_text(out / f"{name}.md", table({name: result}))
    return out / f"{name}.json"

"""What every section reads (Page) and the cells and sentences several sections write."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from comlora.markdown import mean_std
from comlora.study import prose
from comlora.study.analysis import FIGURE2_PAIRS, Study
from comlora.study.figures import RunFigures
from comlora.study.pilot import Study2
from comlora.study.prose import fill
from comlora.study.records import TASKS, RecordedRun

COLUMNS = [column for _, column in TASKS]


@dataclass
class Page:
    """What a section may read."""

    study: Study
    command: str                   # the command that writes the page
    path: Path                     # the page (its figure links are relative to its folder)
    figures: list[RunFigures]      # drawn before the page is rendered (figures.draw_figures)
    study2: Study2 | None = None   # Study II's records and findings (None: the page has Study I only)
    track_figures: dict[str, list[RunFigures]] = field(default_factory=dict)   # Study II's, by track name


def missing_line(study: Study, names: list[str]) -> str:
    """Which planned runs of ``names`` are not yet recorded, or that all are."""
    missing = study.missing(names)
    return fill(prose.NOT_YET_RECORDED, missing="; ".join(missing)) if missing else prose.ALL_RECORDED


def accuracy_cells(runs: list[RecordedRun]) -> list[str]:
    """Each task's accuracy and the average (as the evaluation files record them), mean ± std over ``runs``."""
    for run in runs:
        absent = [task for task, _ in TASKS if task not in run.result.get("tasks", {})]
        if absent:
            raise ValueError(f"{run.path / 'eval'}: the evaluation has no {absent}")
    cells = [mean_std([r.result["tasks"][task]["accuracy"] for r in runs]) for task, _ in TASKS]
    return cells + [mean_std([r.result["average"] for r in runs])]


def no_accuracy() -> list[str]:
    return ["–"] * (len(TASKS) + 1)


def claims_tested(study: Study) -> str:
    """How many claims the page tests, and which."""
    figure2 = " and ".join(fill(prose.AGAINST, a=study.label(a), b=study.label(b)) for a, b in FIGURE2_PAIRS)
    claims = len(study.paper["claims"])
    return fill(prose.CLAIMS_TESTED, tests=claims + 1 + len(FIGURE2_PAIRS) + 1, accuracy_claims=claims,
                figure2_pairs=figure2)

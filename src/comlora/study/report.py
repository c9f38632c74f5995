"""``comlora study-report``: the reproduction page (docs/reproduction.md) and its figures, computed from the runs
``comlora study`` recorded (``RESULTS/<experiment>/seed-<s>/``, see runner.py) and shown beside the paper's numbers
(``experiments/study/paper-numbers.json``). No number on the page is typed: each comes from those files.

The layers: statistics.py (pure functions) <- records.py (the loaded runs) <- comparisons.py and analysis.py (the
findings, each computed once) <- sections/ (one function per section, returning its named result) and prose.py
(each section's template). figures.py draws the figures before the page is rendered. A new section is a function in
sections/ (a new module there for a new part of the study), its template in prose.py and its entry in SECTIONS.
"""

from __future__ import annotations

from pathlib import Path

from comlora.storage import write_text
from comlora.study.analysis import Study
from comlora.study.figures import draw_figures
from comlora.study.prose import render
from comlora.study.sections import claims, runs, tables
from comlora.study.sections.page import Page

SECTIONS = [claims.header, claims.summary, claims.verdicts, tables.table3, tables.against_chance, tables.paired_lora,
            tables.ablations, tables.table10, runs.figures, runs.early_decision, runs.run_list]


def markdown_page(study: Study, page: Path, figures: Path, command: str) -> str:
    """The page's Markdown, its sections in the order of SECTIONS; the figures are drawn into ``figures`` first."""
    context = Page(study, command, page, draw_figures(study, figures))
    return "\n\n".join(render(section(context)) for section in SECTIONS).rstrip() + "\n"


def write_report(experiments: str | Path, results: str | Path, out: str | Path, figures: str | Path,
                 paper: str | Path | None = None, command: str | None = None) -> Path:
    """Build the page from the recorded runs and write it (and the figures) atomically."""
    out, figures = Path(out), Path(figures)
    command = command or (f"comlora study-report --experiments {experiments} --results {results} --out {out} "
                          f"--figures {figures}")
    write_text(out, markdown_page(Study(experiments, results, paper), out, figures, command))
    return out

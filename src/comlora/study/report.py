"""``comlora study-report``: the reproduction page (docs/reproduction.md) and its figures, computed from the runs
``comlora study`` recorded (``RESULTS/<experiment>/seed-<s>/``, see experiments.py) and shown beside the paper's numbers
(``experiments/study/paper-numbers.json``). No number on the page is typed: each comes from those files.

The layers: statistics.py (pure functions) <- records.py (the loaded runs) <- comparisons.py and analysis.py (the
findings, each computed once) <- sections/ (one function per section, returning its named result) and prose.py
(each section's template). figures.py draws the figures before the page is rendered. A new section is a function in
sections/ (a new module there for a new part of the study), its template in prose.py and its entry in SECTIONS.

Study II (issue 26) follows Study I on the same page, read from its own folders (tracks.py <- results2.py <- pilot.py
<- sections/study2.py and sections/study2_results.py); its sections return None, and are left out, when the page is
written without it.
"""

from __future__ import annotations

from pathlib import Path

from comlora.storage import write_text
from comlora.study.analysis import Study
from comlora.study.figures import draw_figures, draw_track_figures
from comlora.study.pilot import Study2
from comlora.study.prose import render
from comlora.study.sections import claims, runs, study2, study2_results, tables
from comlora.study.sections.page import Page

SECTIONS = [claims.header, claims.summary, claims.verdicts, tables.table3, tables.against_chance, tables.paired_lora,
            tables.ablations, tables.table10, runs.figures, runs.early_decision, runs.run_list,
            study2.header, study2.clipping, study2.pilot, study2.regime, study2.estimate,
            study2_results.convai2, study2_results.commonsense]


def markdown_page(study: Study, page: Path, figures: Path, command: str, second: Study2 | None = None) -> str:
    """The page's Markdown, its sections in the order of SECTIONS (those returning None left out); the figures (Study
    I's, then Study II's) are drawn into ``figures`` first."""
    drawn = draw_figures(study, figures)
    track_figures = {t.name: draw_track_figures(second.track_results(t), figures)
                     for t in (second.tracks if second else [])}
    context = Page(study, command, page, drawn, second, track_figures)
    texts = [render(result) for result in (section(context) for section in SECTIONS) if result is not None]
    return "\n\n".join(texts).rstrip() + "\n"


def write_report(experiments: str | Path, results: str | Path, out: str | Path, figures: str | Path,
                 paper: str | Path | None = None, command: str | None = None,
                 study2_experiments: str | Path | None = None, study2_results: str | Path | None = None) -> Path:
    """Build the page from the recorded runs and write it (and the figures) atomically; with Study II's folders
    (both or neither) its part follows Study I's."""
    if (study2_experiments is None) != (study2_results is None):
        raise ValueError("write_report: give Study II's experiments and results folders together, or neither")
    out, figures = Path(out), Path(figures)
    command = command or (f"comlora study-report --experiments {experiments} --results {results} --out {out} "
                          f"--figures {figures}")
    study = Study(experiments, results, paper)
    second = None if study2_experiments is None else Study2(study2_experiments, study2_results, study)
    write_text(out, markdown_page(study, out, figures, command, second))
    return out

"""The report's figures, drawn before the page is written: Figures 2 and 3 of every recorded ComLoRA run of
FIGURE2_PAIRS, beside the LoRA run of the same seed (plots.py); and of Study II's ComLoRA runs tagged figures, beside
the runs of the same seed that results2.FIGURE_PARTNERS names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from comlora.study.analysis import FIGURE2_PAIRS, MAIN, Study

if TYPE_CHECKING:
    from comlora.study.results2 import TrackResults


@dataclass
class RunFigures:
    """Figures 2 and 3 of one recorded ComLoRA run; none when its metrics.jsonl is missing."""

    comlora: str                   # the experiment
    lora: str                      # the LoRA experiment of its pair
    seed: int
    metrics: Path                  # the run's metrics.jsonl
    figure2: Path | None           # training loss of each component (and of the LoRA run of the seed, if recorded)
    figure3: Path | None           # share of the steps of each window at which each component had the lowest loss
    beside_lora: bool              # Figure 2 has another run's curve
    window: int                    # steps per window of Figure 3
    beside: tuple[str, ...] = ()   # the experiments whose curves Figure 2 has besides the run's own


def run_figures(run, comlora: str, lora: str, label: str, others: list[tuple[str, str, Path]], folder: Path,
                prefix: str) -> RunFigures:
    """Figures 2 and 3 of one ComLoRA run (a RecordedRun or tracks.TrackRun) into
    ``folder/figure<2|3>-<prefix>seed<s>.png``: ``label`` its curves' label, ``others`` the (experiment, curve label,
    run folder) drawn beside it in Figure 2 where their metrics.jsonl exists."""
    from comlora.plots import plot_loss_curves, plot_lowest_loss_share

    metrics = run.path / "metrics.jsonl"
    if not metrics.is_file():
        return RunFigures(comlora, lora, run.seed, metrics, None, None, False, run.window)
    folder.mkdir(parents=True, exist_ok=True)
    drawn = [(name, text, path) for name, text, path in others if (path / "metrics.jsonl").is_file()]
    curves = {label: run.path, **{text: path for _, text, path in drawn}}
    figure2 = plot_loss_curves(curves, folder / f"figure2-{prefix}seed{run.seed}.png")
    figure3 = plot_lowest_loss_share(run.path, folder / f"figure3-{prefix}seed{run.seed}.png", run.window)
    return RunFigures(comlora, lora, run.seed, metrics, figure2, figure3, bool(drawn), run.window,
                      tuple(name for name, _, _ in drawn))


def draw_figures(study: Study, folder: Path) -> list[RunFigures]:
    """Draw Figures 2 and 3 of every recorded run of each FIGURE2_PAIRS experiment into ``folder`` (created only when
    there is a figure to draw): ``figure<2|3>-seed<s>.png`` for MAIN, ``figure<2|3>-<experiment>-seed<s>.png`` else."""
    drawn = []
    for comlora, lora in FIGURE2_PAIRS:
        if comlora not in study.experiments:
            continue
        prefix = "" if comlora == MAIN else f"{comlora}-"
        for run in study.recorded(comlora):
            other = study.runs.get(lora, {}).get(run.seed)
            others = [] if other is None else [(lora, f"{study.label(lora)} seed {run.seed}", other.path)]
            drawn.append(run_figures(run, comlora, lora, f"{study.label(comlora)} seed {run.seed}", others, folder,
                                     prefix))
    return drawn


def draw_track_figures(results: TrackResults, folder: Path) -> list[RunFigures]:
    """Draw Figures 2 and 3 of every recorded run of the track's experiments tagged figures into ``folder``, as
    ``figure<2|3>-<experiment>-seed<s>.png``, Figure 2 beside the runs of the same seed of its FIGURE_PARTNERS."""
    track, drawn = results.track, []
    for name, partners in results.figure_experiments:
        for run in track.recorded(name):
            others = [(other, f"{track.experiments[other].label} seed {run.seed}", track.runs[other][run.seed].path)
                      for other in partners if run.seed in track.runs[other]]
            drawn.append(run_figures(run, name, partners[-1] if partners else "", f"{track.experiments[name].label} "
                                     f"seed {run.seed}", others, folder, f"{name}-"))
    return drawn

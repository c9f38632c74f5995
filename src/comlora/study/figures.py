"""The report's figures, drawn before the page is written: Figures 2 and 3 of every recorded ComLoRA run of
FIGURE2_PAIRS, beside the LoRA run of the same seed (plots.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from comlora.study.analysis import FIGURE2_PAIRS, MAIN, Study


@dataclass
class RunFigures:
    """Figures 2 and 3 of one recorded ComLoRA run; none when its metrics.jsonl is missing."""

    comlora: str                   # the experiment
    lora: str                      # the LoRA experiment of its pair
    seed: int
    metrics: Path                  # the run's metrics.jsonl
    figure2: Path | None           # training loss of each component (and of the LoRA run of the seed, if recorded)
    figure3: Path | None           # share of the steps of each window at which each component had the lowest loss
    beside_lora: bool              # Figure 2 has the LoRA run's curve
    window: int                    # steps per window of Figure 3


def draw_figures(study: Study, folder: Path) -> list[RunFigures]:
    """Draw Figures 2 and 3 of every recorded run of each FIGURE2_PAIRS experiment into ``folder`` (created only when
    there is a figure to draw): ``figure<2|3>-seed<s>.png`` for MAIN, ``figure<2|3>-<experiment>-seed<s>.png`` else."""
    from comlora.plots import plot_loss_curves, plot_lowest_loss_share

    drawn = []
    for comlora, lora in FIGURE2_PAIRS:
        if comlora not in study.experiments:
            continue
        prefix = "" if comlora == MAIN else f"{comlora}-"
        for run in study.recorded(comlora):
            metrics = run.path / "metrics.jsonl"
            if not metrics.is_file():
                drawn.append(RunFigures(comlora, lora, run.seed, metrics, None, None, False, run.window))
                continue
            folder.mkdir(parents=True, exist_ok=True)
            curves = {f"{study.label(comlora)} seed {run.seed}": run.path}
            other = study.runs.get(lora, {}).get(run.seed)
            if other is not None and (other.path / "metrics.jsonl").is_file():
                curves[f"{study.label(lora)} seed {run.seed}"] = other.path
            figure2 = plot_loss_curves(curves, folder / f"figure2-{prefix}seed{run.seed}.png")
            figure3 = plot_lowest_loss_share(run.path, folder / f"figure3-{prefix}seed{run.seed}.png", run.window)
            drawn.append(RunFigures(comlora, lora, run.seed, metrics, figure2, figure3, len(curves) > 1, run.window))
    return drawn

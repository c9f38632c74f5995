"""Study II's part of the page: its header, the clipping each study used, the pilot per track, the regime chosen and
the estimate of Study II's cost. Each section is None when the page has no Study II (``Page.study2``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from string import Template
from typing import ClassVar

from comlora import markdown
from comlora.study import prose
from comlora.study.cells import signed
from comlora.study.experiments import BASE_FILE
from comlora.study.pilot import (
    BUDGET_HOURS,
    PLANNED_ROWS,
    REGIME_STANDARD_ERRORS,
    SEEDS,
    TRACK_BUDGET_HOURS,
    PilotRow,
    Regime,
    SizeEstimate,
    Study2,
)
from comlora.study.prose import fill
from comlora.study.tracks import CONVAI2, PILOT, Track
from comlora.training.config import TrainConfig


def hours(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def ses_text(value: float) -> str:
    return f"{value:.1f}"


def sizes_list(texts: list[str]) -> str:
    return ", ".join(texts)


# ---- header -------------------------------------------------------------------------------------------------------

@dataclass
class Study2Header:
    """What Study II is, what it plans and how much of it is recorded."""

    results: str
    experiments_dir: str
    tracks: str
    threshold: int
    seeds: int
    rows: str
    recorded: str
    unplanned: str
    template: ClassVar[Template] = prose.STUDY2_HEADER


def header(page) -> Study2Header | None:
    study2: Study2 | None = page.study2
    if study2 is None:
        return None
    rows = [prose.BASE_SCORED_ONCE if row.study1 is None else row.label if len(row.tasks) > 1
            else fill(prose.CONVAI2_ONLY, row=row.label) for row in PLANNED_ROWS]
    left_out = [f"{len(t.experiments) - len(study2.counted(t))} of {t.title}" for t in study2.tracks
                if len(study2.counted(t)) < len(t.experiments)]
    counts = dict(recorded=study2.recorded_runs, planned=study2.planned_runs, experiments_dir=study2.experiments_dir,
                  experiments=sum(len(study2.counted(t)) for t in study2.tracks),
                  left_out=fill(prose.LEFT_OUT, experiments=", ".join(left_out)) if left_out else "")
    recorded = fill(prose.STUDY2_RECORDED if study2.recorded_runs else prose.STUDY2_NOTHING, **counts)
    return Study2Header(results=str(study2.results), experiments_dir=str(study2.experiments_dir),
                        tracks=", ".join(t.name for t in study2.tracks), threshold=REGIME_STANDARD_ERRORS, seeds=SEEDS,
                        rows="; ".join(rows), recorded=recorded,
                        unplanned=fill(prose.UNPLANNED, runs=", ".join(study2.unplanned)) if study2.unplanned else "")


# ---- clipping -----------------------------------------------------------------------------------------------------

@dataclass
class Clipping:
    """The clipping of Study I (its base.yaml) and of Study II's tracks (theirs, TrainConfig's default if unset)."""

    study1: str
    study1_file: str
    study1_mode: str
    study1_norm: str
    study2: str
    exceptions: str
    template: ClassVar[Template] = prose.CLIPPING


def clipping_text(mode: str, norm: float) -> str:
    return fill(prose.CLIP_JOINT if mode == "joint" else prose.CLIP_PER_GROUP, norm=norm)


def clipping(page) -> Clipping | None:
    study2: Study2 | None = page.study2
    if study2 is None:
        return None
    study = page.study
    mode = study.base.get("clip_grad", TrainConfig.clip_grad)
    norm = float(study.base.get("max_grad_norm", TrainConfig.max_grad_norm))
    per_track = {t.name: t.clip_grad() for t in study2.tracks}
    if len(set(per_track.values())) == 1:
        files = ", ".join(f"`{t.folder / BASE_FILE}`" for t in study2.tracks)
        text = fill(prose.CLIP_TRACKS, clipping=clipping_text(*per_track[study2.tracks[0].name]), files=files)
    else:
        text = "; ".join(fill(prose.CLIP_TRACK, track=t.name, clipping=clipping_text(*per_track[t.name]),
                              file=t.folder / BASE_FILE) for t in study2.tracks)
    exceptions = [fill(prose.CLIP_EXCEPTION, experiment=name, mode=t.clip_grad(name)[0])
                  for t in study2.tracks for name in t.experiments if t.clip_grad(name) != per_track[t.name]]
    return Clipping(study1=clipping_text(mode, norm), study1_file=str(study.experiments_dir / BASE_FILE),
                    study1_mode=mode, study1_norm=norm, study2=text, exceptions="".join(e + " " for e in exceptions))


# ---- pilot --------------------------------------------------------------------------------------------------------

@dataclass
class Pilot:
    """Per track, every recorded pilot run: the primary metric and its paired difference against the base model."""

    tracks: str
    template: ClassVar[Template] = prose.PILOT


def pilot_cells(track: Track, row: PilotRow) -> list[str]:
    convai2 = track.task == CONVAI2
    c = row.against_base
    items = "0" if not row.items else "all" if math.isinf(row.items) else f"{row.items:,}"
    return [row.label, str(row.run.seed), items,
            f"{row.primary:.4f}" if convai2 else f"{row.primary:.1f}",
            f"{row.secondary:.2f}" if convai2 else f"{row.secondary:.1f}",
            "–" if c is None else f"{signed(c.difference, 4 if convai2 else 1)} ± {c.se:.{4 if convai2 else 1}f}",
            "–" if c is None else ses_text(c.standard_errors), hours(row.run.hours("train_seconds")),
            hours(row.run.hours("eval_seconds")), str(row.run.record.get("steps", "–"))]


def scored_text(track: Track, row: PilotRow) -> str:
    result = row.run.result
    if track.task == CONVAI2:
        return fill(prose.PILOT_SCORED_CONVAI2, turns=f"{len(result['items']):,}",
                    tokens=f"{sum(i['tokens'] for i in result['items']):,}")
    return fill(prose.PILOT_SCORED_COMMONSENSE, items=f"{sum(len(t['items']) for t in result['tasks'].values()):,}",
                tasks=len(result["tasks"]))


def pilot_table(track: Track, rows: list[PilotRow]) -> str:
    header = (["run", "seed", "training items", "test NLL per token", "perplexity", "Δ NLL per token vs base ± SE"]
              if track.task == CONVAI2 else
              ["run", "seed", "training items", "acc_norm", "acc", "Δ acc_norm vs base ± SE (points)"])
    return markdown.table(header + ["paired SEs", "training h", "evaluation h", "steps"],
                          [pilot_cells(track, row) for row in rows])


def pilot(page) -> Pilot | None:
    study2: Study2 | None = page.study2
    if study2 is None:
        return None
    blocks = []
    for track in study2.tracks:
        rows = study2.pilot(track)
        missing = track.missing(track.tagged(PILOT))
        blocks.append(fill(prose.PILOT_TRACK, title=track.title, folder=track.folder,
                           missing=fill(prose.NOT_YET_RECORDED, missing="; ".join(missing)) if missing
                           else prose.ALL_RECORDED,
                           scored=scored_text(track, rows[0]) if rows else "",
                           table=pilot_table(track, rows) if rows else ""))
    return Pilot(tracks="\n\n".join(blocks))


# ---- regime -------------------------------------------------------------------------------------------------------

@dataclass
class RegimeChoice:
    """Per track, the regime the rule chooses from the recorded pilot, or why the choice waits."""

    threshold: int
    tracks: str
    template: ClassVar[Template] = prose.REGIME


def size_ses(size) -> str:
    return fill(prose.REGIME_SIZE, size=size.text,
                ses=", ".join(ses_text(r.against_base.standard_errors) for r in size.rows))


def regime_line(track: Track, regime: Regime) -> str:
    title = track.title
    if not regime.sizes:
        return fill(prose.REGIME_NO_SIZE, track=title)
    if track.superseded:
        return fill(prose.REGIME_SUPERSEDED, track=title,
                    sizes=sizes_list([size_ses(s) if s.compared else s.text for s in regime.sizes]))
    if regime.chosen:
        size = regime.chosen
        row = size.rows[0]
        digits, unit = (4, " nats per token") if track.task == CONVAI2 else (1, " points of acc_norm")
        cheaper = regime.sizes[:regime.sizes.index(size)]
        return fill(prose.REGIME_CHOSEN, track=title, size=size.text, experiment=size.experiment,
                    difference=f"{signed(row.against_base.difference, digits)}{unit}",
                    ses=", ".join(ses_text(r.against_base.standard_errors) for r in size.rows),
                    threshold=REGIME_STANDARD_ERRORS,
                    cheaper=fill(prose.REGIME_CHEAPER, sizes=sizes_list([size_ses(s) for s in cheaper]))
                    if cheaper else "")
    if regime.none_passes:
        return fill(prose.REGIME_NONE_PASSES, track=title, sizes=sizes_list([size_ses(s) for s in regime.sizes]))
    unrecorded = [s.text for s in regime.waiting_for if not s.recorded]
    waiting = "; ".join(([fill(prose.REGIME_UNRECORDED, sizes=sizes_list(unrecorded))] if unrecorded else [])
                        + ([] if track.base_model and track.runs[track.base_model] else [prose.BASE_NOT_RECORDED]))
    passing = next((s for s in regime.sizes if s.passes), None)
    if passing is not None:
        return fill(prose.REGIME_PASSES_BUT_WAITS, track=title, size=passing.text,
                    ses=", ".join(ses_text(r.against_base.standard_errors) for r in passing.rows), waiting=waiting)
    compared = [size_ses(s) for s in regime.sizes if s.compared]
    recorded = fill(prose.REGIME_RECORDED, sizes=sizes_list(compared)) if compared else prose.REGIME_NOTHING
    return fill(prose.REGIME_WAITS, track=title, recorded=recorded, waiting=waiting)


def regime(page) -> RegimeChoice | None:
    study2: Study2 | None = page.study2
    if study2 is None:
        return None
    lines = [regime_line(track, study2.regime(track)) for track in study2.tracks]
    return RegimeChoice(threshold=REGIME_STANDARD_ERRORS, tracks="\n".join(lines))


# ---- estimate -----------------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    """Study II's hours per track at the chosen (or each recorded) size, and the budget they fit."""

    study1_results: str
    seeds: int
    costs: str
    tracks: str
    budget: str
    template: ClassVar[Template] = prose.ESTIMATE


def costs_table(study2: Study2) -> str:
    rows = []
    for planned in PLANNED_ROWS:
        if planned.study1 is None:
            rows.append([planned.label, "– (nothing trained)", "–", "–", "0", "1"])
            continue
        cost = study2.relative_costs[planned.study1]
        rows.append([planned.label, f"`{planned.study1}`", ", ".join(map(str, cost.seeds)) or "none recorded",
                     "–" if cost.train_seconds is None else f"{cost.train_seconds:.0f}",
                     "–" if cost.ratio is None else f"{cost.ratio:.2f}", str(cost.evaluations)])
    return markdown.table(["Study II row", "costed from (Study I)", "Study I seeds", "mean training s",
                           "÷ LoRA r=8", "evaluations per run"], rows)


def estimate_table(estimate: SizeEstimate) -> str:
    rows = [[r.planned.label, str(r.seeds), hours(r.train_hours), hours(r.eval_hours)] for r in estimate.rows]
    rows.append(["**total**", "", f"**{hours(estimate.train_hours)}**", f"**{hours(estimate.eval_hours)}**"])
    return markdown.table(["row", "seeds", "training h", "evaluation h"], rows)


def fits(value: float, budget: int) -> str:
    return fill(prose.WITHIN if value <= budget else prose.OVER, budget=budget)


def budget_text(study2: Study2, estimates: dict[str, list[SizeEstimate]]) -> str:
    sizes = [fill(prose.BUDGET_SIZE, track=track.title, size=e.size.text, hours=hours(e.train_hours),
                  fits="–" if e.train_hours is None else
                  f"{'within' if e.train_hours <= TRACK_BUDGET_HOURS else 'over'} {TRACK_BUDGET_HOURS} h")
             for track in study2.tracks for e in estimates.get(track.name, [])]
    running = [t for t in study2.tracks if not t.superseded and not study2.regime(t).none_passes]
    chosen = all(study2.regime(t).chosen for t in running)
    first = [estimates[t.name][0] if estimates[t.name] else None for t in running]
    together = ""
    if running and None not in first and None not in [e.train_hours for e in first]:
        total = sum(e.train_hours for e in first)
        if len(running) == 1 and len([t for t in study2.tracks if not t.superseded]) > 1:
            together = fill(prose.BUDGET_ONE_TRACK, track=running[0].title, hours=hours(total),
                            verdict=fits(total, BUDGET_HOURS)) if chosen else ""
        else:
            basis = [fill(prose.BUDGET_CHOSEN if study2.regime(t).chosen else prose.BUDGET_CHEAPEST, track=t.title,
                          size=e.size.text) for t, e in zip(running, first)]
            together = fill(prose.BUDGET_TOGETHER, basis=" and ".join(basis), hours=hours(total),
                            verdict=fits(total, BUDGET_HOURS))
    return fill(prose.BUDGET, track_budget=TRACK_BUDGET_HOURS, budget=BUDGET_HOURS,
                sizes=("; ".join(sizes) + ".") if sizes else "", together=together)


def estimate(page) -> Estimate | None:
    study2: Study2 | None = page.study2
    if study2 is None:
        return None
    costed = [t for t in study2.tracks if not t.superseded]
    estimates = {t.name: study2.estimates(t) for t in costed}
    blocks = []
    for track in costed:
        tables = [fill(prose.ESTIMATE_TRACK, title=fill(prose.ESTIMATE_HEADING, size=f"{track.title} at {e.size.text}",
                                                        train=hours(e.lora.hours("train_seconds")),
                                                        eval=hours(e.lora.hours("eval_seconds")),
                                                        threads=e.lora.record.get("omp_num_threads") or "unset"),
                       table=estimate_table(e)) for e in estimates[track.name]]
        blocks += tables or [fill(prose.ESTIMATE_TRACK, title=track.title, table=prose.ESTIMATE_NONE)]
    return Estimate(study1_results=str(study2.study1.results), seeds=SEEDS, costs=costs_table(study2),
                    tracks="\n\n".join(blocks), budget=budget_text(study2, estimates))

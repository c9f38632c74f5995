"""Study II's pilot findings, each computed once from the recorded runs: every pilot run against the base model
(PilotRow), each track's regime (the cheapest training size at which LoRA r=8 beats the base model by at least
REGIME_STANDARD_ERRORS paired standard errors on the primary metric) and the estimate of Study II's cost at that size,
from the pilot's measured times and Study I's measured relative costs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from comlora.methods.registry import get_method
from comlora.study.experiments import train_config
from comlora.study.records import StudyRecords
from comlora.study.results2 import TrackResults
from comlora.study.statistics import PairedDifference
from comlora.study.tracks import CONVAI2, PILOT, TRACK_TASKS, Study2Records, Track, TrackRun

REGIME_STANDARD_ERRORS = 10        # issue 26: LoRA r=8 beats the base model by at least this many paired SEs
SEEDS = 3                          # Study II's seeds per trained row
TRACK_BUDGET_HOURS = 15            # issue 26: about 15 CPU hours of training per track
BUDGET_HOURS = 30                  # and about 30 for both tracks together
STUDY1_LORA_R8 = "t3-lora-r8"      # the reference of Study I's relative training costs


class PlannedRow(NamedTuple):
    """A row of Study II (issue 26 item 3) and the Study I experiment whose measured cost stands in for it."""

    label: str
    study1: str | None             # None: the base model, nothing trained (scored once)
    tasks: tuple[str, ...]         # the tracks (by task) that run it


PLANNED_ROWS = [
    PlannedRow("Base model", None, TRACK_TASKS),
    PlannedRow("LoRA r=8", STUDY1_LORA_R8, TRACK_TASKS),
    PlannedRow("LoRA r=16", "t3-lora-r16", TRACK_TASKS),
    PlannedRow("ComLoRA (2, 8)", "t3-comlora-k2-r8", TRACK_TASKS),
    PlannedRow("ComLoRA (4, 4)", "t3-comlora-k4-r4", TRACK_TASKS),
    PlannedRow("ComLoRA (2, 8), decide_at 0.5", "decide-0.5", TRACK_TASKS),
    PlannedRow("LoRA r=8 at ComLoRA (2, 8)'s training compute", "t3-lora-r8-2epochs", TRACK_TASKS),
    PlannedRow("ComLoRA (2, 8), clip_grad joint", "t3-comlora-k2-r8", (CONVAI2,)),
]


@dataclass
class PilotRow:
    """One recorded pilot run: its primary and secondary metric and its paired difference against the base model."""

    run: TrackRun
    label: str
    items: float                   # training items (0: the base model)
    primary: float                 # ConvAI2: test NLL per token; commonsense: acc_norm averaged over the tasks
    secondary: float               # perplexity; acc
    against_base: PairedDifference | None      # None: the base model itself, or the base model not yet recorded

    @property
    def passes(self) -> bool:
        return self.against_base is not None and self.against_base.standard_errors >= REGIME_STANDARD_ERRORS


@dataclass
class Size:
    """One training size of LoRA r=8 in a track's pilot and its recorded runs."""

    experiment: str
    text: str                      # '1,000 turns'
    items: float
    rows: list[PilotRow]           # its recorded runs (empty: not yet recorded)

    @property
    def recorded(self) -> bool:
        return bool(self.rows)

    @property
    def passes(self) -> bool:
        """Every recorded run of the size beats the base model by REGIME_STANDARD_ERRORS paired SEs."""
        return self.recorded and all(row.passes for row in self.rows)

    @property
    def compared(self) -> bool:
        return self.recorded and all(row.against_base is not None for row in self.rows)


@dataclass
class Regime:
    """A track's regime: its pilot's LoRA r=8 sizes (cheapest first) and the choice, if it can be made."""

    sizes: list[Size]
    chosen: Size | None            # the cheapest passing size, every cheaper size recorded and failing
    waiting_for: list[Size]        # the unrecorded sizes cheaper than any passing one (or all, when none passes)

    @property
    def none_passes(self) -> bool:
        """Every size is recorded and compared, and none passes."""
        return bool(self.sizes) and all(s.compared and not s.passes for s in self.sizes)


@dataclass
class RelativeCost:
    """A Study I experiment's mean training seconds (over its recorded seeds) ÷ LoRA r=8's, and its evaluations."""

    experiment: str
    seeds: list[int]
    train_seconds: float | None    # mean over the seeds (None: none recorded)
    ratio: float | None            # ÷ Study I's LoRA r=8 (None: either not recorded)
    evaluations: int               # evaluations per run: every component under components: all, else one


@dataclass
class CostRow:
    """A Study II row's estimated hours at one size."""

    planned: PlannedRow
    seeds: int
    train_hours: float | None      # None: its relative cost is not recorded in Study I
    eval_hours: float | None


@dataclass
class SizeEstimate:
    """Study II's estimated hours on one track at one size, from the pilot's LoRA r=8 run at that size."""

    size: Size
    lora: TrackRun                 # the pilot run whose times are scaled (the first recorded seed)
    rows: list[CostRow]

    @property
    def train_hours(self) -> float | None:
        """The rows' training hours summed (None: a row's cost is unknown)."""
        values = [r.train_hours for r in self.rows]
        return None if None in values else sum(values)

    @property
    def eval_hours(self) -> float | None:
        values = [r.eval_hours for r in self.rows]
        return None if None in values else sum(values)


class Study2(Study2Records):
    """Study II's records (Study2Records) and its pilot's findings, each computed once; ``study1`` gives the
    relative training costs of Study II's rows."""

    def __init__(self, experiments_dir, results, study1: StudyRecords):
        super().__init__(experiments_dir, results)
        self.study1 = study1
        self._pilot: dict[str, list[PilotRow]] = {}
        self._results: dict[str, TrackResults] = {}

    def track_results(self, track: Track) -> TrackResults:
        """The track's results table and claims (results2.TrackResults), computed once."""
        if track.name not in self._results:
            self._results[track.name] = TrackResults(track)
        return self._results[track.name]

    def pilot(self, track: Track) -> list[PilotRow]:
        """Every recorded pilot run of ``track``: the base model first, then by training items and name."""
        if track.name not in self._pilot:
            base = track.recorded(track.base_model)[0] if track.base_model and track.runs[track.base_model] else None
            names = sorted(track.tagged(PILOT), key=lambda n: (track.training_items(n), n))
            self._pilot[track.name] = [
                PilotRow(run, track.experiments[name].label, track.training_items(name), *track.primary(run),
                         None if base is None or name == track.base_model else track.against(run, base))
                for name in names for run in track.recorded(name)]
        return self._pilot[track.name]

    def regime(self, track: Track) -> Regime:
        rows = self.pilot(track)
        names = sorted((n for n in track.tagged(PILOT) if track.is_lora_r8(n)),
                       key=lambda n: (track.training_items(n), n))
        sizes = [Size(n, track.size_text(n), track.training_items(n), [r for r in rows if r.run.experiment == n])
                 for n in names]
        passing = next((i for i, s in enumerate(sizes) if s.passes), None)
        cheaper = sizes if passing is None else sizes[:passing]
        waiting = [s for s in cheaper if not s.compared]
        chosen = sizes[passing] if passing is not None and not waiting else None
        return Regime(sizes, chosen, waiting)

    def runs_main_rows(self, track: Track) -> bool:
        """False when every pilot size is compared and none passes: as issue 26 plans, the track's result is then
        its pilot curve, and its main rows are not run."""
        return not self.regime(track).none_passes

    def counted(self, track: Track) -> list[str]:
        """The track's experiments the study counts: all, or only the pilot's where the pilot found no regime."""
        return list(track.experiments) if self.runs_main_rows(track) else track.tagged(PILOT)

    @property
    def planned_runs(self) -> int:
        """The runs of the counted experiments, times their seeds."""
        return sum(t.planned(self.counted(t)) for t in self.tracks)

    @property
    def recorded_runs(self) -> int:
        return sum(len(t.runs[name]) for t in self.tracks for name in self.counted(t))

    @cached_property
    def relative_costs(self) -> dict[str, RelativeCost]:
        """Study I's measured training time of each experiment PLANNED_ROWS names, relative to LoRA r=8's."""
        study1 = self.study1
        out = {}
        for name in dict.fromkeys(r.study1 for r in PLANNED_ROWS if r.study1):
            runs = study1.recorded(name) if name in study1.experiments else []
            seconds = [r.record["train_seconds"] for r in runs if r.record.get("train_seconds") is not None]
            exp = study1.experiments.get(name)
            cfg = train_config(study1.base, exp, exp.seeds[0], "check") if exp and exp.train else None
            every = cfg is not None and get_method(cfg.method).selects_winner and exp.components == "all"
            out[name] = RelativeCost(name, [r.seed for r in runs], statistics.mean(seconds) if seconds else None, None,
                                     cfg.num_components if every else 1)
        reference = out[STUDY1_LORA_R8].train_seconds
        for cost in out.values():
            if cost.train_seconds is not None and reference:
                cost.ratio = cost.train_seconds / reference
        return out

    def estimate(self, track: Track, size: Size) -> SizeEstimate | None:
        """Study II's hours on ``track`` at ``size``: per trained row, the pilot's LoRA r=8 training seconds times
        the row's relative cost times SEEDS, and its evaluation seconds times the evaluations per run times SEEDS;
        the base model is scored once, in the pilot base model's evaluation seconds. None before the size is
        recorded."""
        if not size.recorded:
            return None
        lora = size.rows[0].run
        base = track.recorded(track.base_model) if track.base_model else []
        base_eval = base[0].record.get("eval_seconds") if base else None
        rows = []
        for planned in PLANNED_ROWS:
            if track.task not in planned.tasks:
                continue
            if planned.study1 is None:
                rows.append(CostRow(planned, 1, 0.0, None if base_eval is None else base_eval / 3600))
                continue
            cost = self.relative_costs[planned.study1]
            train, evaluate = lora.record.get("train_seconds"), lora.record.get("eval_seconds")
            rows.append(CostRow(planned, SEEDS,
                                None if cost.ratio is None or train is None else train * cost.ratio * SEEDS / 3600,
                                None if evaluate is None else evaluate * cost.evaluations * SEEDS / 3600))
        return SizeEstimate(size, lora, rows)

    def estimates(self, track: Track) -> list[SizeEstimate]:
        """The estimates at the chosen size, or before a choice at each recorded size."""
        regime = self.regime(track)
        sizes = [regime.chosen] if regime.chosen else [s for s in regime.sizes if s.recorded]
        return [e for e in (self.estimate(track, s) for s in sizes) if e is not None]

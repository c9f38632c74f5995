"""The study's findings, each computed once from the recorded runs: the paired comparisons, the verdict on each of
the paper's claims (paper-numbers.json's accuracy claims, Table 10's count of winners, Figures 2 and 3), and the
baselines against chance. The report's sections (sections/) read them from a ``Study``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from comlora.study.comparisons import ComponentCheck, LossComparison, Paired, loss_comparison, paired_comparison
from comlora.study.records import StudyRecords, fixed_answer_accuracy, paper_average, uniform_choice_accuracy
from comlora.study.statistics import at_least_k_successes, chance_verdict

TABLE3_ORDER = ["t3-base-model", "t3-lora-r8", "t3-lora-r16", "t3-lora-r8-2epochs", "t3-dora-r8", "t3-moelora-k2-r8",
                "t3-teamlora-k2-r8", "t3-loratrf-r8", "t3-comlora-k2-r8", "t3-comlora-k4-r4"]
MAIN = "t3-comlora-k2-r8"          # ComLoRA (2, 8): the full row of every ablation, Table 10, the figures
LORA_R8 = "t3-lora-r8"             # beside it in Figure 2 and in the early-decision table
FIGURE2_PAIRS = [("t3-comlora-k4-r4", "t3-lora-r16"),   # the paper's Figure 2 setting (its LoRA r=4 has no run here)
                 (MAIN, LORA_R8)]                       # our main configuration
ABLATION_TABLES = ["table5", "table6", "table7", "table8", "table9"]


@dataclass
class ClaimOutcome:
    """One accuracy claim of paper-numbers.json: the paper's two averages, this study's paired comparison (None
    before both experiments have a seed recorded) and the verdict."""

    claim: dict                    # claim, table, better, than
    paper_better: float
    paper_than: float
    comparison: Paired | None
    verdict: str


@dataclass
class Table10Outcome:
    """Table 10's claim (the selector's winner is the best component) over the runs that test it."""

    checks: list[ComponentCheck]   # the runs of experiments tagged table10 that have a selector
    winners_best: int              # runs whose winner was the (tied) best component on the test items
    p: float                       # P(at least winners_best by chance), each run's chance |best| / K
    lowest_loss_best: int          # runs whose lowest-validation-loss component was a best one
    verdict: str


@dataclass
class Figure2Outcome:
    """Figure 2's claim for one pair of FIGURE2_PAIRS."""

    comlora: str
    lora: str
    comparison: LossComparison | None
    verdict: str


@dataclass
class Figure3Outcome:
    """Figure 3's claim (the winner had the lowest training loss most often at the end) over Table 10's runs."""

    checks: list[ComponentCheck]   # Table 10's runs with training metrics
    winners_dominant: int          # runs whose winner had the lowest loss most often (or tied) in the last window
    p: float                       # P(at least winners_dominant by chance), each run's chance |most often| / K
    rose: int                      # runs whose winner's share of the lowest-loss steps rose from first to last window
    verdict: str


class Baselines(NamedTuple):
    """Accuracy per task of answering without a model, on the evaluation items (the same for every run)."""

    uniform: dict[str, float]      # a uniform random pick among the task's answers
    fixed: dict[str, float]        # the task's most frequent correct answer for every item


class Study(StudyRecords):
    """The recorded study (StudyRecords) and its findings, each computed once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._paired: dict[tuple[str, str], Paired | None] = {}

    def paired(self, a: str, b: str) -> Paired | None:
        """``a`` vs ``b`` over the seeds both have recorded (None if there is none)."""
        if (a, b) not in self._paired:
            seeds = self.common_seeds(a, b)
            self._paired[(a, b)] = paired_comparison(
                [(self.runs[a][s].result, self.runs[a][s].source) for s in seeds],
                [(self.runs[b][s].result, self.runs[b][s].source) for s in seeds], seeds) if seeds else None
        return self._paired[(a, b)]

    def not_measured(self, a: str, b: str) -> str:
        """The verdict of a comparison of ``a`` and ``b`` before both have a seed recorded."""
        return f"not measured yet (missing: {'; '.join(self.missing([a, b])) or 'no seed recorded for both'})"

    @cached_property
    def claim_outcomes(self) -> list[ClaimOutcome]:
        """Each accuracy claim of the paper's numbers, in their order."""
        outcomes = []
        for claim in self.paper["claims"]:
            better, than = claim["better"], claim["than"]
            paper_better = paper_average(self.paper, claim["table"], better)
            paper_than = paper_average(self.paper, claim["table"], than)
            c = self.paired(better, than)
            result = (self.not_measured(better, than) if c is None
                      else c.verdict(math.copysign(1, paper_better - paper_than)))
            outcomes.append(ClaimOutcome(claim, paper_better, paper_than, c, result))
        return outcomes

    @cached_property
    def component_checks(self) -> list[ComponentCheck]:
        """Every recorded ComLoRA run with all its components evaluated: those tagged table10 first (MAIN first)."""
        names = sorted(self.runs, key=lambda n: ("table10" not in self.experiments[n].tables, n != MAIN, n))
        return [ComponentCheck(run, "table10" in self.experiments[name].tables) for name in names
                for run in self.recorded(name)
                if run.winner and len(run.components()) > 1]

    @cached_property
    def table10(self) -> Table10Outcome | None:
        """Table 10's claim over the table10 runs with a selector; None before any such run is recorded."""
        checks = [c for c in self.component_checks if c.outside_the_claim is None]
        if not checks:
            return None
        k = sum(c.winner_is_best for c in checks)
        p = at_least_k_successes(k, [c.chance for c in checks])
        by_loss = sum(bool(set(c.lowest_val_loss) & set(c.best)) for c in checks if c.lowest_val_loss)
        return Table10Outcome(checks, k, p, by_loss, chance_verdict(p))

    @cached_property
    def figure2(self) -> list[Figure2Outcome]:
        """Figure 2's claim per pair of FIGURE2_PAIRS."""
        outcomes = []
        for comlora, lora in FIGURE2_PAIRS:
            seeds = self.common_seeds(comlora, lora)
            if not seeds:
                outcomes.append(Figure2Outcome(comlora, lora, None, self.not_measured(comlora, lora)))
                continue
            c = loss_comparison([self.runs[comlora][s] for s in seeds], [self.runs[lora][s] for s in seeds],
                                self.runs[comlora][seeds[0]].window)
            outcomes.append(Figure2Outcome(comlora, lora, c, "not measured (no training step in both runs' "
                                           "metrics.jsonl)" if c is None else c.verdict()))
        return outcomes

    @cached_property
    def figure3(self) -> Figure3Outcome | None:
        """Figure 3's claim over Table 10's runs with training metrics; None before any is recorded."""
        checks = [c for c in (self.table10.checks if self.table10 else []) if c.dominant_at_the_end]
        if not checks:
            return None
        k = sum(c.winner in c.dominant_at_the_end for c in checks)
        p = at_least_k_successes(k, [len(c.dominant_at_the_end) / len(c.components) for c in checks])
        rose = sum(first[c.winner] / sum(first.values()) < last[c.winner] / sum(last.values())
                   for c in checks for first, last in [c.lowest_loss_windows])
        return Figure3Outcome(checks, k, p, rose, chance_verdict(p))

    @cached_property
    def table3_recorded(self) -> list[str]:
        """The Table 3 experiments with a recorded run, in the table's order."""
        names = [n for n in TABLE3_ORDER + self.tagged("table3") if n in self.experiments and self.runs.get(n)]
        return list(dict.fromkeys(names))

    @cached_property
    def baselines(self) -> Baselines | None:
        """The baselines of the evaluation items (the same for every run, so read from the first recorded Table 3
        run); None before any is recorded."""
        if not self.table3_recorded:
            return None
        result = self.recorded(self.table3_recorded[0])[0].result
        return Baselines(uniform_choice_accuracy(result), fixed_answer_accuracy(result))

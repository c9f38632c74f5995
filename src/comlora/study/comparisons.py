"""The comparisons the report makes between recorded runs: two runs' accuracies paired on the evaluation items
(statistics.py's paired bootstrap and sign test), a ComLoRA and a LoRA run's training losses step by step (the
moving-block bootstrap, Figure 2), and a ComLoRA run's components against each other (Table 10, Figure 3)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from comlora.study.cells import signed
from comlora.study.records import TASKS, RecordedRun
from comlora.study.statistics import ALPHA, NOT_DISTINGUISHABLE, block_bootstrap, paired_bootstrap, sign_test, verdict


def item_correctness(result: dict, source: str) -> dict[tuple[str, object], tuple[str, float]]:
    """(task, item index) -> (answer, 1.0 if correct else 0.0) of one commonsense evaluation result."""
    out = {}
    for task, _ in TASKS:
        if task not in result.get("tasks", {}):
            raise ValueError(f"{source}: no {task!r} in its evaluation (tasks: {sorted(result.get('tasks', {}))})")
        for position, item in enumerate(result["tasks"][task]["items"]):
            key = (task, item["index"] if item.get("index") is not None else position)
            out[key] = (item["answer"], 1.0 if item["correct"] else 0.0)
    return out


def mean_correctness(results: list[tuple[dict, str]]) -> dict[tuple[str, object], tuple[str, float]]:
    """(task, index) -> (answer, correctness averaged over the results) on the items every result answered."""
    maps = [item_correctness(r, source) for r, source in results]
    keys = set.intersection(*(set(m) for m in maps))
    return {k: (maps[0][k][0], sum(m[k][1] for m in maps) / len(maps)) for k in keys}


@dataclass
class Paired:
    """A paired comparison of A and B (statistics.py); accuracies and difference in points."""

    seeds: list[int]
    items: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_bootstrap: float
    a_better: int
    b_better: int
    p_sign: float

    def interval(self) -> str:
        """'difference [95% CI]' in points."""
        return f"{signed(self.difference)} [{signed(self.ci_low)}, {signed(self.ci_high)}]"

    def outcome(self, a: str, b: str) -> str:
        """Which of the two is better at p < ALPHA, if either."""
        if self.p_bootstrap >= ALPHA:
            return NOT_DISTINGUISHABLE
        return f"{a if self.difference > 0 else b} better"

    def verdict(self, paper_sign: float = 1.0) -> str:
        return verdict(self.difference * paper_sign, self.p_bootstrap)


def paired_comparison(a: list[tuple[dict, str]], b: list[tuple[dict, str]], seeds: list[int]) -> Paired:
    """Compare evaluation results ``a`` and ``b`` (one per seed, as (result, source)) on their common items."""
    ca, cb = mean_correctness(a), mean_correctness(b)
    keys = sorted(set(ca) & set(cb), key=str)
    if not keys:
        raise ValueError(f"{a[0][1]} and {b[0][1]} have no evaluation item in common")
    for k in keys:
        if ca[k][0] != cb[k][0]:
            raise ValueError(f"{a[0][1]} and {b[0][1]}: item {k} has answer {ca[k][0]!r} in one and {cb[k][0]!r} in "
                             "the other; the runs were evaluated on different items")
    d = np.array([ca[k][1] - cb[k][1] for k in keys])
    low, high, p = paired_bootstrap(d)
    wins, losses = int(np.count_nonzero(d > 0)), int(np.count_nonzero(d < 0))
    return Paired(seeds=seeds, items=len(keys), accuracy_a=100 * float(np.mean([ca[k][1] for k in keys])),
                  accuracy_b=100 * float(np.mean([cb[k][1] for k in keys])), difference=100 * float(d.mean()),
                  ci_low=100 * low, ci_high=100 * high, p_bootstrap=p, a_better=wins, b_better=losses,
                  p_sign=sign_test(wins, losses))


@dataclass
class LossComparison:
    """The paper's Figure 2 claim for a ComLoRA and a LoRA experiment over the seeds both have: at each optimizer
    step t (the same batch in both runs of a seed), d_t = loss_LoRA(t) - max_k loss_k(t), > 0 when every component's
    loss is below LoRA's; the mean of d over the steps with a moving-block bootstrap (block_bootstrap)."""

    seeds: list[int]               # those with steps in common
    per_seed: list[float]          # mean of d_t over each seed's steps
    steps: int
    every_lower: int               # steps with d_t > 0
    difference: float
    ci_low: float
    ci_high: float
    p_bootstrap: float
    block: int

    def verdict(self) -> str:
        return verdict(self.difference, self.p_bootstrap)


def figure2_difference(comlora_step: dict, lora_step: dict) -> float:
    """Figure 2's d_t: LoRA's loss minus the highest of the components' losses at one step."""
    return lora_step["lm"] - max(comlora_step["component_loss"])


def loss_comparison(comlora: list, lora: list, block: int,
                    step_difference: Callable[[dict, dict], float] = figure2_difference) -> LossComparison | None:
    """Figure 2's d_t (LossComparison) over the competing steps of paired runs (one per common seed; RecordedRun or
    tracks.TrackRun), or another ``step_difference`` of the two runs' metrics at a step; None when no seed has a
    training step in both."""
    series, seeds = [], []
    for a, b in zip(comlora, lora):
        lora_steps = {s["step"]: s for s in b.training_steps}
        d = []
        for step in (s for s in a.training_steps if "component_loss" in s and s["step"] in lora_steps):
            other = lora_steps[step["step"]]
            if {"target_tokens"} <= step.keys() & other.keys() and step["target_tokens"] != other["target_tokens"]:
                raise ValueError(f"{a.source} and {b.source}: step {step['step']} has {step['target_tokens']} and "
                                 f"{other['target_tokens']} target tokens; the runs did not train on the same batches")
            d.append(step_difference(step, other))
        if d:
            series.append(d)
            seeds.append(a.seed)
    if not series:
        return None
    low, high, p = block_bootstrap(series, block)
    every = np.concatenate(series)
    return LossComparison(seeds=seeds, per_seed=[float(np.mean(d)) for d in series], steps=every.size,
                          every_lower=int(np.count_nonzero(every > 0)), difference=float(every.mean()), ci_low=low,
                          ci_high=high, p_bootstrap=p, block=block)


class LowestLossWindows(NamedTuple):
    """How often each component had the lowest training loss in a window of steps (Figure 3's bars)."""

    first: Counter
    last: Counter


@dataclass
class ComponentCheck:
    """Table 10 for one ComLoRA run with every component evaluated: whether the selector's winner was the best."""

    run: RecordedRun
    table10: bool                  # the experiment is tagged table10: the method as specified, K and r aside

    @property
    def components(self) -> dict[int, dict]:
        return self.run.components()

    @property
    def winner(self) -> int:
        return self.run.winner["winner"]

    @property
    def best(self) -> list[int]:
        """The components with the highest average accuracy on the test items (several when tied)."""
        top = max(r["average"] for r in self.components.values())
        return [k for k, r in self.components.items() if r["average"] == top]

    @property
    def winner_is_best(self) -> bool:
        return self.winner in self.best

    @property
    def chance(self) -> float:
        """The probability that a component picked at random is (tied) best: |best| / K."""
        return len(self.best) / len(self.components)

    @property
    def lowest_val_loss(self) -> list[int]:
        val_loss = self.run.winner.get("val_loss") or []
        return [k for k, v in enumerate(val_loss) if v == min(val_loss)]

    @property
    def outside_the_claim(self) -> str | None:
        """Why the run does not test the paper's Table 10 claim (None: it does). The claim is about ComLoRA as
        specified, the experiments tagged table10; an ablation changes the method, and its seed-0 run shares its
        initialisation and data order with the full method's, so it would be no independent trial."""
        if self.run.winner.get("winner_by_similarity") is None:
            return "no selector"
        if not self.table10:
            return "an ablation"
        return None

    @cached_property
    def lowest_loss_windows(self) -> LowestLossWindows:
        """How often each component had the lowest training loss in the first and in the last window of the steps at
        which the components competed (Figure 3's first and last bars: windows of ``run.window`` steps from the
        first)."""
        window = self.run.window
        competing = [s.get("lowest_loss_component", int(np.argmin(s["component_loss"])))
                     for s in self.run.training_steps if "component_loss" in s]
        return LowestLossWindows(Counter(competing[:window]),
                                 Counter(competing[(len(competing) - 1) // window * window:]))

    @cached_property
    def dominant_at_the_end(self) -> list[int]:
        """The components with the lowest loss most often in the last window (several when tied)."""
        last = self.lowest_loss_windows.last
        return sorted(k for k, n in last.items() if n == max(last.values())) if last else []

    @cached_property
    def against_best_other(self) -> Paired | None:
        """The winner against the best of the other components, paired on the items."""
        others = [k for k in self.components if k != self.winner]
        if self.winner not in self.components or not others:
            return None
        other = max(others, key=lambda k: self.components[k]["average"])
        return paired_comparison([(self.components[self.winner], self.run.source)],
                                 [(self.components[other], self.run.source)], [self.run.seed])

"""``comlora study-report``: the reproduction page (docs/reproduction.md) and its figures, computed from the runs
``comlora study`` recorded (``RESULTS/<experiment>/seed-<s>/``, see runner.py) and shown beside the paper's numbers
(``experiments/study/paper-numbers.json``). No number on the page is typed: each comes from those files.

Statistics (one pair of runs A, B over the evaluation items both answered and the seeds both have):
  c_i = correctness of item i averaged over the seeds,  d_i = c_i(A) - c_i(B),  difference = 100 * mean_i d_i;
  paired bootstrap: resample the items with replacement; 95% CI = 2.5th/97.5th percentiles of the resampled
  difference; two-sided p = (1 + #{|d* - d| >= |d|}) / (1 + resamples), the resampled differences shifted to the
  null of no difference;
  sign test: n = #{i: d_i != 0}, k = #{i: d_i > 0}, p = min(1, 2 * sum_{j <= min(k, n-k)} C(n, j) / 2^n).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

from comlora.study.runner import Experiment, load_experiments
from comlora.storage import write_text
from comlora.training.config import TrainConfig

TASKS = [("boolq", "BoolQ"), ("piqa", "PIQA"), ("social_i_qa", "SIQA"), ("ARC-Challenge", "ARC-c"),
         ("ARC-Easy", "ARC-e"), ("openbookqa", "OBQA"), ("hellaswag", "HellaS"), ("winogrande", "WinoG")]
TABLE3_ORDER = ["t3-base-model", "t3-lora-r8", "t3-lora-r16", "t3-lora-r8-2epochs", "t3-dora-r8", "t3-moelora-k2-r8",
                "t3-teamlora-k2-r8", "t3-loratrf-r8", "t3-comlora-k2-r8", "t3-comlora-k4-r4"]
MAIN = "t3-comlora-k2-r8"          # ComLoRA (2, 8): the full row of every ablation, Table 10, the figures
LORA_R8 = "t3-lora-r8"             # beside it in Figure 2 and in the early-decision table
FIGURE2_PAIRS = [("t3-comlora-k4-r4", "t3-lora-r16"),   # the paper's Figure 2 setting (its LoRA r=4 has no run here)
                 (MAIN, LORA_R8)]                       # our main configuration
ABLATION_TABLES = ["table5", "table6", "table7", "table8", "table9"]
ALPHA = 0.05
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
PAPER_FILE = "paper-numbers.json"


# ---- statistics ---------------------------------------------------------------------------------

def paired_bootstrap(differences, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(2.5th percentile, 97.5th percentile, two-sided p) of mean(d) over items resampled with replacement;
    p = (1 + #{|mean(d*) - mean(d)| >= |mean(d)|}) / (1 + resamples)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("paired_bootstrap needs a non-empty 1-D sequence of per-item differences")
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(0, d.size, size=(min(1000, resamples - start), d.size))].mean(axis=1)
                            for start in range(0, resamples, 1000)])
    return bootstrap_summary(means, d.mean())


def bootstrap_summary(means: np.ndarray, observed: float) -> tuple[float, float, float]:
    """(2.5th percentile, 97.5th percentile, two-sided p) of resampled means around the observed one:
    p = (1 + #{|mean* - observed| >= |observed|}) / (1 + resamples)."""
    extreme = np.count_nonzero(np.abs(means - observed) >= abs(observed) - 1e-12)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high), (1 + int(extreme)) / (1 + means.size)


def block_bootstrap(series: list, block: int, resamples: int = RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """paired_bootstrap's (low, high, p) for the mean of d over several series of dependent values (one per training
    run): each resample redraws every series as consecutive blocks of ``block`` values starting at random positions
    (a moving-block bootstrap, wrapping at the end), which keeps the dependence between neighbouring values."""
    series = [np.asarray(x, dtype=np.float64) for x in series if len(x)]
    if not series or block < 1:
        raise ValueError("block_bootstrap needs a non-empty series and a block of >= 1 values")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for x in series:
        starts = rng.integers(0, x.size, size=(resamples, -(-x.size // block)))
        positions = (starts[:, :, None] + np.arange(block)).reshape(resamples, -1)[:, :x.size] % x.size
        total += x[positions].sum(axis=1)
    return bootstrap_summary(total / sum(x.size for x in series), np.concatenate(series).mean())


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: p = min(1, 2 * sum_{j <= min(wins, losses)} C(n, j) / 2^n), n = wins + losses."""
    if wins < 0 or losses < 0:
        raise ValueError(f"sign_test needs counts >= 0, got {wins} and {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, j) for j in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def at_least_k_successes(k: int, chances: list[float]) -> float:
    """P(X >= k) for X the number of successes in independent trials with success probabilities p_i (the binomial
    when they are equal): P_0 = [1], P_i[j] = P_{i-1}[j] (1 - p_i) + P_{i-1}[j - 1] p_i, then sum_{j >= k} P_n[j]."""
    dist = [1.0]
    for p in chances:
        dist = [a * (1 - p) + b * p for a, b in zip(dist + [0.0], [0.0] + dist)]
    return sum(dist[max(k, 0):])


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
    """A paired comparison of A and B (module docstring); accuracies and difference in points."""

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
            return "not distinguishable at this scale"
        return f"{a if self.difference > 0 else b} better"

    def verdict(self, paper_sign: float = 1.0) -> str:
        return verdict(self.difference * paper_sign, self.p_bootstrap)


def signed(value: float, digits: int = 1) -> str:
    """The value with its sign, a value that rounds to zero as +0.0 (not -0.0)."""
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def chance_verdict(p: float) -> str:
    """A count against chance (Tables 10, Figure 3) is supported when P(at least as many by chance) < ALPHA."""
    return "supported" if p < ALPHA else "not distinguishable at this scale"


def verdict(difference: float, p: float) -> str:
    """Supported: the difference (signed so that > 0 is the paper's direction) is > 0 with p < ALPHA; not supported:
    < 0 with p < ALPHA; otherwise not distinguishable."""
    if p >= ALPHA:
        return "not distinguishable at this scale"
    return "supported" if difference > 0 else "not supported (the opposite is significant)"


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


def loss_comparison(comlora: list["RecordedRun"], lora: list["RecordedRun"], block: int) -> LossComparison | None:
    """Figure 2's d_t (LossComparison) over the competing steps of paired runs (one per common seed); None when no
    seed has a training step in both."""
    series, seeds = [], []
    for a, b in zip(comlora, lora):
        lora_steps = {s["step"]: s for s in b.training_steps}
        d = []
        for step in (s for s in a.training_steps if "component_loss" in s and s["step"] in lora_steps):
            other = lora_steps[step["step"]]
            if {"target_tokens"} <= step.keys() & other.keys() and step["target_tokens"] != other["target_tokens"]:
                raise ValueError(f"{a.source} and {b.source}: step {step['step']} has {step['target_tokens']} and "
                                 f"{other['target_tokens']} target tokens; the runs did not train on the same batches")
            d.append(other["lm"] - max(step["component_loss"]))
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


# ---- recorded runs --------------------------------------------------------------------------------

COMPONENT_FILE = re.compile(r"-component(\d+)(-winner)?")


def most_common_share(values: list) -> float:
    """100 * (count of the most common value) / len(values)."""
    return 100 * Counter(values).most_common(1)[0][1] / len(values)


def fixed_answer_accuracy(result: dict) -> dict[str, float]:
    """Per task, the accuracy of answering every item with the task's most frequent correct answer:
    100 * max_a #{i: answer_i = a} / n (a ceiling for any one fixed answer)."""
    return {task: most_common_share([item["answer"] for item in result["tasks"][task]["items"]]) for task, _ in TASKS}


def uniform_choice_accuracy(result: dict) -> dict[str, float]:
    """Per task, the expected accuracy of a uniform random pick among the answers the task's items have:
    100 / #{distinct correct answers} (the options no item has as its answer are not counted)."""
    return {task: 100 / len({item["answer"] for item in result["tasks"][task]["items"]}) for task, _ in TASKS}


def answer_habits(result: dict) -> tuple[float, float]:
    """(same answer %, no answer %) averaged over the tasks: the share of a task's items given the run's most common
    prediction for that task (no answer counted as one), and the share of items whose response had no answer."""
    tasks = [result["tasks"][task]["items"] for task, _ in TASKS]
    same = statistics.mean(most_common_share([item["prediction"] for item in items]) for items in tasks)
    none = statistics.mean(100 * sum(item["prediction"] is None for item in items) / len(items) for items in tasks)
    return same, none


@dataclass
class RecordedRun:
    """One recorded (experiment, seed): the files ``comlora study`` wrote for it."""

    experiment: str
    seed: int
    path: Path
    record: dict                   # run.json
    config: dict | None            # config.yaml (None: the base model, nothing trained)
    parameters: dict | None
    winner: dict | None            # winner.json (ComLoRA)
    decision: dict | None          # decision.json (early decision)
    evals: dict[str, dict]         # eval file name -> result

    @property
    def result(self) -> dict:
        """The run's evaluation: the winner's for ComLoRA, else the one file."""
        winners = [n for n in self.evals if "-winner" in n]
        names = winners or list(self.evals)
        if len(names) != 1:
            raise ValueError(f"{self.path / 'eval'}: expected one commonsense evaluation of the "
                             f"{'winner' if winners else 'run'}, found {sorted(self.evals)}")
        return self.evals[names[0]]

    @property
    def source(self) -> str:
        return f"{self.experiment}/seed-{self.seed}"

    @property
    def window(self) -> int:
        """Steps per window of Figure 3 (config.yaml's window, else TrainConfig's default)."""
        return int((self.config or {}).get("window") or TrainConfig.window)

    @property
    def max_grad_norm(self) -> float:
        """The clipping norm it trained with (config.yaml's, else TrainConfig's default)."""
        return float((self.config or {}).get("max_grad_norm", TrainConfig.max_grad_norm))

    @cached_property
    def habits(self) -> tuple[float, float]:
        """answer_habits of its evaluation: (same answer %, no answer %)."""
        return answer_habits(self.result)

    @cached_property
    def training_steps(self) -> list[dict]:
        """The optimizer steps of metrics.jsonl (none for the base model), read once."""
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def base_passes_per_token(self) -> float | None:
        """Training compute independent of the machine's load: sum_t P_t * n_t / sum_t n_t over the optimizer steps
        of metrics.jsonl, where n_t is the step's target tokens and P_t the number of components that ran the base
        model on them (len(component_loss) while ComLoRA competes, else 1). LoRA and a decided run: 1 per step."""
        steps = self.training_steps
        if not steps or any("target_tokens" not in s for s in steps):        # metrics of older code
            return None
        tokens = sum(s["target_tokens"] for s in steps)
        passes = [len(s["component_loss"]) if "component_loss" in s else 1 for s in steps]
        return sum(p * s["target_tokens"] for p, s in zip(passes, steps)) / tokens if tokens else None

    def median_step_seconds(self) -> tuple[float | None, float | None]:
        """(competing, one adapter): the median of metrics.jsonl's step_seconds over the steps at which ComLoRA's
        components competed (those with component_loss), and over the others (LoRA, or ComLoRA after its decision);
        None where the run has no such step."""
        timed = [s for s in self.training_steps if "step_seconds" in s]
        competing = [s["step_seconds"] for s in timed if "component_loss" in s]
        alone = [s["step_seconds"] for s in timed if "component_loss" not in s]
        return (statistics.median(competing) if competing else None, statistics.median(alone) if alone else None)

    def components(self) -> dict[int, dict]:
        """ComLoRA component index -> its evaluation (``components: all`` runs have one per component)."""
        out = {}
        for name, result in self.evals.items():
            found = COMPONENT_FILE.search(name)
            if found:
                out[int(found.group(1))] = result
        return dict(sorted(out.items()))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def load_run(experiment: str, seed: int, path: Path) -> RecordedRun:
    optional = {name: read_json(path / f"{name}.json") if (path / f"{name}.json").is_file() else None
                for name in ("parameters", "winner", "decision")}
    evals = {f.stem: read_json(f) for f in sorted((path / "eval").glob("commonsense-*.json"))}
    if not evals:
        raise ValueError(f"{path}: recorded (run.json) but has no eval/commonsense-*.json")
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else None
    return RecordedRun(experiment=experiment, seed=seed, path=path, record=read_json(path / "run.json"), config=config,
                       evals=evals, **optional)


def load_recorded(results: Path, experiments: list[Experiment]) -> tuple[dict[str, dict[int, RecordedRun]], list[str]]:
    """Recorded runs of the planned (experiment, seed)s, and the recorded folders no experiment plans."""
    planned = {e.name: set(e.seeds) for e in experiments}
    runs: dict[str, dict[int, RecordedRun]] = {e.name: {} for e in experiments}
    unplanned = []
    for record in sorted(results.glob("*/seed-*/run.json")) if results.is_dir() else []:
        folder = record.parent
        name, seed_text = folder.parent.name, folder.name.removeprefix("seed-")
        if not seed_text.isdigit() or int(seed_text) not in planned.get(name, set()):
            unplanned.append(f"{name}/{folder.name}")
            continue
        runs[name][int(seed_text)] = load_run(name, int(seed_text), folder)
    return runs, unplanned


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
    def lowest_loss_windows(self) -> tuple[Counter, Counter]:
        """How often each component had the lowest training loss in the first and in the last window of the steps at
        which the components competed (Figure 3's first and last bars: windows of ``run.window`` steps from the
        first)."""
        window = self.run.window
        competing = [s.get("lowest_loss_component", int(np.argmin(s["component_loss"])))
                     for s in self.run.training_steps if "component_loss" in s]
        return Counter(competing[:window]), Counter(competing[(len(competing) - 1) // window * window:])

    @cached_property
    def dominant_at_the_end(self) -> list[int]:
        """The components with the lowest loss most often in the last window (several when tied)."""
        last = self.lowest_loss_windows[1]
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


# ---- formatting -----------------------------------------------------------------------------------

def mean_std(values: list[float], digits: int = 1) -> str:
    """The value for one seed, else mean ± sample standard deviation (n - 1)."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def p_text(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def paper_cells(row: dict) -> list[str]:
    """The paper's task values and average, in italics."""
    return [f"*{v:.2f}*" for v in row["tasks"]] + [f"*{row['average']:.2f}*"]


def seeds_text(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds)) + (" (one seed)" if len(seeds) == 1 else "")


class StudyReport:
    """The page's sections, each from the recorded runs of the experiments it needs."""

    def __init__(self, experiments_dir: str | Path, results: str | Path, paper_file: str | Path | None = None):
        self.experiments_dir, self.results = Path(experiments_dir), Path(results)
        self.base, experiments = load_experiments(self.experiments_dir)
        self.experiments = {e.name: e for e in experiments}
        self.runs, self.unplanned = load_recorded(self.results, experiments)
        self.paper_file = Path(paper_file) if paper_file else self.experiments_dir / PAPER_FILE
        self.paper = load_paper(self.paper_file)
        self._paired: dict[tuple[str, str], Paired | None] = {}

    # ---- lookups
    def tagged(self, table: str) -> list[str]:
        return sorted(n for n, e in self.experiments.items() if table in e.tables)

    def label(self, name: str) -> str:
        return self.experiments[name].label if name in self.experiments else name

    def missing(self, names: list[str]) -> list[str]:
        """Lines naming the planned runs of ``names`` not yet recorded (and names no experiment file defines)."""
        out = []
        for name in names:
            if name not in self.experiments:
                out.append(f"`{name}` (no experiment file)")
                continue
            seeds = [s for s in self.experiments[name].seeds if s not in self.runs[name]]
            if seeds:
                out.append(f"`{name}` seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
        return out

    def missing_line(self, names: list[str]) -> list[str]:
        missing = self.missing(names)
        if not missing:
            return ["All runs of this section are recorded.", ""]
        return [f"Not yet recorded: {'; '.join(missing)}.", ""]

    def recorded(self, name: str) -> list[RecordedRun]:
        return [self.runs[name][s] for s in sorted(self.runs.get(name, {}))]

    def common_seeds(self, a: str, b: str) -> list[int]:
        return sorted(set(self.runs.get(a, {})) & set(self.runs.get(b, {})))

    def not_measured(self, a: str, b: str) -> str:
        """The verdict of a comparison of ``a`` and ``b`` before both have a seed recorded."""
        return f"not measured yet (missing: {'; '.join(self.missing([a, b])) or 'no seed recorded for both'})"

    def paired(self, a: str, b: str) -> Paired | None:
        """``a`` vs ``b`` over the seeds both have recorded (None if there is none)."""
        if (a, b) not in self._paired:
            seeds = self.common_seeds(a, b)
            self._paired[(a, b)] = paired_comparison(
                [(self.runs[a][s].result, self.runs[a][s].source) for s in seeds],
                [(self.runs[b][s].result, self.runs[b][s].source) for s in seeds], seeds) if seeds else None
        return self._paired[(a, b)]

    def accuracy_cells(self, runs: list[RecordedRun]) -> list[str]:
        """Each task's accuracy and the average (as the evaluation files record them), mean ± std over ``runs``."""
        for run in runs:
            absent = [task for task, _ in TASKS if task not in run.result.get("tasks", {})]
            if absent:
                raise ValueError(f"{run.path / 'eval'}: the evaluation has no {absent}")
        cells = [mean_std([r.result["tasks"][task]["accuracy"] for r in runs]) for task, _ in TASKS]
        return cells + [mean_std([r.result["average"] for r in runs])]

    # ---- sections
    def header(self, command: str) -> list[str]:
        planned = [(n, s) for n, e in sorted(self.experiments.items()) for s in e.seeds]
        recorded = [self.runs[n][s] for n, s in planned if s in self.runs[n]]
        commits: dict[str, list[str]] = {}
        for run in recorded:
            commits.setdefault(run.record.get("commit", "unknown"), []).append(run.source)
        b = TrainConfig.from_dict(self.base)          # the defaults filled in
        lines = ["# Reproduction study: ComLoRA at CPU scale", "",
                 f"*Generated by `{command}` (or `make study-report`) from the runs recorded in `{self.results}`: "
                 "every number is computed from those files; do not edit this page by hand, regenerate it.*", "",
                 f"**{len(recorded)} of {len(planned)} planned runs recorded** "
                 f"({len(self.experiments)} experiments in `{self.experiments_dir}`, times their seeds)."]
        if recorded:
            lines.append(f"Latest run started {max(r.record.get('date', '') for r in recorded)}.")
        if len(commits) == 1:
            lines.append(f"All recorded runs ran at commit `{next(iter(commits))}`.")
        elif commits:
            lines += ["", "The recorded runs ran at different commits:", ""]
            lines += [f"- `{c}`: {', '.join(sources)}" for c, sources in commits.items()]
        if self.unplanned:
            lines += ["", f"Recorded but planned by no experiment file (left out): {', '.join(self.unplanned)}."]
        flags = recorded[0].record.get("eval_flags", []) if recorded else []
        lines += ["", f"Setting (from `{self.experiments_dir / 'base.yaml'}`): model `{b.model}`, data `{b.data}` with "
                  f"{b.train_per_task} training items per task ({len(TASKS) * b.train_per_task}), {b.val_size} "
                  f"validation items, {b.eval_size} evaluation items per task (the same {len(TASKS) * b.eval_size} "
                  f"items for every run, data_seed {b.data_seed}), {b.epochs} epoch(s) at lr {b.lr} unless a row says "
                  f"otherwise; evaluation `{' '.join(flags) or '(no run recorded yet)'}`.",
                  "The paper's numbers are the paper's own (LLaMA-3-8B, the full commonsense-170k set, 3 epochs, "
                  f"averages of 5 seeds; `{self.paper_file}`): they are shown beside ours for the "
                  "direction of each effect, not as values this scale could reach. Its ablations (Tables 5, 7-10) "
                  "were run at K = 4; ours use ComLoRA (2, 8), its best configuration and our main one.", "",
                  "Statistics: accuracy in %, mean ± sample standard deviation over the recorded seeds (a single "
                  "value: one seed). Paired comparisons of two runs use the evaluation items both answered, each "
                  "item's correctness averaged over the seeds both have: the difference of accuracy with a 95% "
                  f"paired-bootstrap interval over items ({RESAMPLES:,} resamples, seed {BOOTSTRAP_SEED}), its "
                  "two-sided p (the resampled differences shifted to the null), and an exact sign test on the items "
                  "where the two differ. The bootstrap covers the sampling of evaluation items; the variation between "
                  "training seeds shows in the ± of the tables. A claim is *supported* when the difference has the "
                  f"paper's direction with bootstrap p < {ALPHA}, *not supported* when it has the other direction "
                  f"with p < {ALPHA}, and *not distinguishable at this scale* otherwise. The claims are tested one by "
                  f"one, without a correction for multiple comparisons: of the {self.claims_tested()}, about one in "
                  f"{round(1 / ALPHA)} comes out significant by chance where there is no effect.", ""]
        return lines

    @cached_property
    def claim_outcomes(self) -> list[tuple[dict, str, Paired | None, str]]:
        """Each claim of the paper's numbers: (claim, the paper's averages, the paired comparison or None, verdict)."""
        outcomes = []
        for claim in self.paper["claims"]:
            better, than = claim["better"], claim["than"]
            paper_better = paper_average(self.paper, claim["table"], better)
            paper_than = paper_average(self.paper, claim["table"], than)
            paper = f"{paper_better:.2f} vs {paper_than:.2f} ({claim['table'].replace('table', 'Table ')})"
            c = self.paired(better, than)
            if c is None:
                outcomes.append((claim, paper, None, self.not_measured(better, than)))
            else:
                outcomes.append((claim, paper, c, c.verdict(math.copysign(1, paper_better - paper_than))))
        return outcomes

    def summary(self) -> list[str]:
        """The answer for a user choosing between LoRA and ComLoRA: the count of verdicts, the main paired
        comparison, and the training compute of each choice (base-model passes per training token)."""
        named = [(claim["claim"], result) for claim, _, c, result in self.claim_outcomes if c is not None]
        if self.table10_outcome is not None:
            named.append(("Table 10: the selector's winner is the best component", self.table10_outcome[-1]))
        named += [(f"Figure 2: every component of {self.label(comlora)} has a lower training loss than "
                   f"{self.label(lora)}", result)
                  for comlora, lora, c, result in self.figure2_outcomes if c is not None]
        if self.figure3_outcome is not None:
            named.append(("Figure 3: the winner had the lowest training loss most often at the end",
                          self.figure3_outcome[-1]))
        verdicts = [result for _, result in named]
        counts = Counter(verdicts)                  # in the order of first appearance
        measured = (f"{len(verdicts)} are measured: {', '.join(f'{n} {v}' for v, n in counts.items())}" if verdicts
                    else "none is measured yet")
        lines = ["## In short", "", f"Of the {self.claims_tested()}, {measured}."]
        decided = [f"{claim} — {result}" for claim, result in named if result != "not distinguishable at this scale"]
        if decided:
            lines.append(f"Those with a verdict other than not distinguishable: {'; '.join(decided)}.")
        c = self.paired(MAIN, LORA_R8)
        if c is not None:
            passes = {name: [p for p in (r.base_passes_per_token() for r in self.recorded(name)) if p is not None]
                      for name in [MAIN, LORA_R8, *self.tagged("decide")]}

            def cost(name: str) -> str:
                return f"{statistics.mean(passes[name]):.2f}" if passes.get(name) else "–"

            lines += ["", f"- The choice a user makes, {self.label(MAIN)} against {self.label(LORA_R8)} on the same "
                      f"{c.items} items (seeds {', '.join(map(str, c.seeds))}): {c.accuracy_a:.1f} vs "
                      f"{c.accuracy_b:.1f}, Δ {c.interval()} points, p {p_text(c.p_bootstrap)} "
                      f"({c.outcome('ComLoRA', 'LoRA')}); training costs {cost(MAIN)} base-model passes per "
                      f"training token against {cost(LORA_R8)}."]
            for name in [n for n in self.tagged("decide") if n not in (MAIN, LORA_R8)]:
                d = self.paired(name, LORA_R8)
                if d is not None:
                    lines.append(f"- {self.label(name)} against {self.label(LORA_R8)}: {d.accuracy_a:.1f} vs "
                                 f"{d.accuracy_b:.1f} "
                                 f"({d.interval()} points, p {p_text(d.p_bootstrap)}) at {cost(name)} passes per token.")
        main = {r.seed: r.result["average"] for r in self.recorded(MAIN)}
        if len(main) > 1:
            lines += ["", f"Between training seeds alone, {self.label(MAIN)} averages "
                      f"{', '.join(f'{a:.1f}' for a in main.values())} (seeds {', '.join(map(str, main))}; "
                      f"range {max(main.values()) - min(main.values()):.1f} points); the one-seed ablations are "
                      f"compared with its seed {min(main)} ({main[min(main)]:.1f}), so a one-seed difference smaller "
                      "than that range is within what another seed could give."]
        return lines + self.scale_note() + [""]

    def verdicts(self) -> list[str]:
        rows = []
        for claim, paper, c, verdict in self.claim_outcomes:
            if c is None:
                rows.append([claim["claim"], paper, *["–"] * 5, verdict])
                continue
            rows.append([claim["claim"], paper, f"{c.accuracy_a:.1f} vs {c.accuracy_b:.1f}", c.interval(),
                         p_text(c.p_bootstrap), p_text(c.p_sign), seeds_text(c.seeds), f"**{verdict}**"])
        lines = ["## Verdicts on the paper's claims", "",
                 "Each claim compares two runs on the same items (their common seeds); this study's accuracies are "
                 "those of the paired items, and Δ is the run the paper finds better minus the other (> 0: the "
                 "paper's direction; the ablation tables below show Δ the other way round, ablated minus full). A "
                 "one-seed comparison shows the effect of the change for one initialisation only.", ""]
        lines += markdown_table(["claim of the paper", "paper avg (LLaMA-3-8B)", "this study", "Δ points [95% CI]",
                                 "p (bootstrap)", "p (sign test)", "seeds", "verdict"], rows)
        lines += ["", *self.table10_claim(), "", *self.figure_claims(), ""]
        return lines

    def table3(self) -> list[str]:
        names = [n for n in TABLE3_ORDER if n in self.experiments and "table3" in self.experiments[n].tables]
        names += [n for n in self.tagged("table3") if n not in names]
        paper_rows = {r["experiment"]: r for r in self.paper["tables"]["table3"]["rows"] if r["experiment"]}
        rows = []
        for name in names:
            runs = self.recorded(name)
            params = "–"
            if runs and runs[0].parameters:
                p = runs[0].parameters
                params = f"{100 * p['adapter'] / p['base']:.2f}/{100 * p['router'] / p['base']:.2f}"
            rows.append([self.label(name), len(runs), params, *(self.accuracy_cells(runs) if runs else ["–"] * 9)])
            if name in paper_rows:
                r = paper_rows[name]
                rows.append([f"↳ *paper: {r['row']}*", "", r["params_l_s"], *paper_cells(r)])
        lines = ["## Table 3 analogue: the methods on the 8 commonsense tasks", ""] + self.missing_line(names)
        lines += markdown_table(["method", "seeds", "L/S %", *[c for _, c in TASKS], "average"], rows)
        others = [r["row"] for r in self.paper["tables"]["table3"]["rows"] if not r["experiment"]]
        lines += ["", "L/S %: trainable parameters of the adapters (L) and of the selector or router (S) as % of the "
                  "base model (`parameters.json`). Rows in italics are the paper's (LLaMA-3-8B); it has no base-model, "
                  "2-epoch, DoRA, MoE of LoRA, TeamLoRA or LoRATRF row, and its rows "
                  f"{', '.join(others)} have no counterpart here."]
        if any(not self.experiments[n].train and len(self.experiments[n].seeds) == 1
               and all("--greedy" in r.record.get("eval_flags", []) for r in self.recorded(n)) for n in names):
            lines[-1] += (" The base model is evaluated with one seed: nothing is trained and decoding is greedy, so "
                          "another seed would give the same answers.")
        lines.append("")
        return lines

    @cached_property
    def table3_recorded(self) -> list[str]:
        """The Table 3 experiments with a recorded run, in the table's order."""
        names = [n for n in TABLE3_ORDER + self.tagged("table3") if n in self.experiments and self.runs.get(n)]
        return list(dict.fromkeys(names))

    @cached_property
    def baselines(self) -> tuple[dict[str, float], dict[str, float]] | None:
        """(uniform random pick, one fixed answer) accuracy per task on the evaluation items (the same for every
        run, so read from the first recorded Table 3 run); None before any is recorded."""
        if not self.table3_recorded:
            return None
        result = self.recorded(self.table3_recorded[0])[0].result
        return uniform_choice_accuracy(result), fixed_answer_accuracy(result)

    def fixed_answer(self) -> list[str]:
        """Table 3's rows against chance and one fixed answer per task, the share of a task's items each run gave its
        most common answer, and the share of responses with no answer."""
        lines = ["### Against chance and one fixed answer per task", ""]
        if self.baselines is None:
            return lines + ["No Table 3 run recorded yet.", ""]
        uniform, fixed = self.baselines
        rows = []
        for name in self.table3_recorded:
            runs = self.recorded(name)
            habits = [r.habits for r in runs]
            average = statistics.mean(r.result["average"] for r in runs)
            rows.append([self.label(name), len(runs), mean_std([r.result["average"] for r in runs]),
                         signed(average - statistics.mean(uniform.values())),
                         signed(average - statistics.mean(fixed.values())),
                         mean_std([h[0] for h in habits]), mean_std([h[1] for h in habits])])
        lines += [f"A uniform random pick among the answers of each task's items scores "
                  f"{', '.join(f'{c} {uniform[t]:.0f}' for t, c in TASKS)}: {statistics.mean(uniform.values()):.1f} on "
                  "average (the distinct correct answers of a task's items stand in for its options). Answering "
                  "every item of a task with its most frequent correct answer scores "
                  f"{', '.join(f'{c} {fixed[t]:.0f}' for t, c in TASKS)}: {statistics.mean(fixed.values()):.1f}, the "
                  "ceiling of any one fixed answer per task. *Same answer*: the share of a task's items a run answered "
                  "with its most common answer for that task (no answer counted as one answer), averaged over the "
                  "tasks; *no answer*: the share of responses in which no option was found.", ""]
        lines += markdown_table(["method", "seeds", "average", "Δ vs random pick", "Δ vs fixed answer",
                                 "same answer %", "no answer %"], rows)
        return lines + [""]

    def scale_note(self) -> list[str]:
        """In short's reading of the trained Table 3 rows against chance and one fixed answer; its conclusion only
        when no trained method beats one fixed answer per task."""
        trained = [n for n in self.table3_recorded if any(r.config for r in self.recorded(n))]
        if self.baselines is None or not trained:
            return []
        uniform, fixed = (statistics.mean(b.values()) for b in self.baselines)
        averages = [statistics.mean(r.result["average"] for r in self.recorded(n)) for n in trained]
        habits = [r.habits for n in trained for r in self.recorded(n)]
        same, none = [h[0] for h in habits], [h[1] for h in habits]
        text = (f"For scale: a uniform random pick among each task's answers averages {uniform:.1f}, and answering "
                f"each task with its most frequent correct answer {fixed:.1f}. The trained methods of Table 3 average "
                f"{min(averages):.1f} to {max(averages):.1f}; their runs give their most common answer to "
                f"{min(same):.0f}-{max(same):.0f}% of a task's items and no answer in at most {max(none):.1f}% of "
                "responses.")
        if max(averages) < fixed:
            text += (" None beats one fixed answer per task: at this scale the models learned to answer in the "
                     "tasks' format but mostly not the tasks, so the comparisons here are between models that did "
                     "not learn them; they cannot tell whether competition helps once the tasks are learned.")
        return ["", text]

    def paired_lora(self) -> list[str]:
        loras = [n for n in TABLE3_ORDER + self.tagged("table3") if n in self.experiments
                 and (self.experiments[n].train or {}).get("method") == "lora"]
        loras = list(dict.fromkeys(loras))
        lines = [f"## Paired comparison: {self.label(MAIN)} against each LoRA row", ""]
        lines += self.missing_line([MAIN, *loras])
        rows = []
        for name in loras:
            c = self.paired(MAIN, name)
            if c is None:
                rows.append([self.label(name)] + ["–"] * 8)
                continue
            rows.append([self.label(name), seeds_text(c.seeds), c.items, f"{c.accuracy_a:.1f} vs {c.accuracy_b:.1f}",
                         c.interval(), p_text(c.p_bootstrap),
                         f"{c.a_better} / {c.b_better}", p_text(c.p_sign), c.outcome("ComLoRA", "LoRA")])
        lines += markdown_table(["LoRA row", "seeds", "items", f"{self.label(MAIN)} vs LoRA", "Δ points [95% CI]",
                                 "p (bootstrap)", "items better / worse", "p (sign test)", f"at p < {ALPHA}"], rows)
        lines += ["", "Per item, correctness is averaged over the seeds both runs have; an item counts as better or "
                  "worse when that average differs. The 2-epoch LoRA row is the control no paper has: LoRA with the "
                  "training compute of ComLoRA K=2.", ""]
        return lines

    def ablation(self, table: str) -> list[str]:
        spec = self.paper["tables"][table]
        members = self.tagged(table)
        by_experiment = {r["experiment"]: r for r in spec["rows"] if r["experiment"]}
        names = [r["experiment"] for r in spec["rows"] if r["experiment"] in members]
        names += [n for n in members if n not in names]
        lines = [f"### {spec['title']}", ""]
        if not names:
            return lines + [f"No experiment of the study is tagged {table}.", ""]
        lines += self.missing_line(names)
        full_seeds = sorted(self.runs.get(MAIN, {}))
        compared = sorted({tuple(c.seeds) for n in names if n != MAIN and (c := self.paired(n, MAIN)) is not None
                           and list(c.seeds) != full_seeds})           # the full row's seeds a paired test uses
        rows, stats = [], []
        for name in names:
            runs = self.recorded(name)
            label = self.label(name) + (" (full)" if name == MAIN else "")
            rows.append([label, len(runs), *(self.accuracy_cells(runs) if runs else ["–"] * 9)])
            if name in by_experiment:
                r = by_experiment[name]
                rows.append([f"↳ *paper: {r['row']}*", "", *paper_cells(r)])
            if name == MAIN:
                rows += [[f"{label}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}", len(seeds),
                          *self.accuracy_cells([self.runs[MAIN][s] for s in seeds])] for seeds in compared]
                continue
            c = self.paired(name, MAIN)
            paper_delta = (f"{by_experiment[name]['average'] - by_experiment[MAIN]['average']:+.2f}"
                           if name in by_experiment and MAIN in by_experiment else "–")
            claimed = any(cl["table"] == table and cl["better"] == MAIN and cl["than"] == name
                          for cl in self.paper["claims"])
            if c is None:
                stats.append([self.label(name), "–", "–", "–", "–", paper_delta, "not measured yet"])
            else:
                stats.append([self.label(name), seeds_text(c.seeds), c.interval(), p_text(c.p_bootstrap),
                              p_text(c.p_sign), paper_delta, c.verdict(paper_sign=-1) if claimed else "–"])
        lines += markdown_table(["run", "seeds", *[c for _, c in TASKS], "average"], rows)
        lines += ["", f"The paper's rows (italics): {spec['setting']}. Paired against the full row "
                  "(Δ = this row − full, on the seeds both have):", ""]
        lines += markdown_table(["run", "seeds", "Δ points [95% CI]", "p (bootstrap)", "p (sign test)",
                                 "paper Δ (avg)", "the paper's claim (full is better)"], stats)
        return lines + [""]

    def ablations(self) -> list[str]:
        lines = ["## Ablations (Tables 5-9) on ComLoRA (2, 8)", "",
                 "Each row: mean ± std over its recorded seeds (most ablations have one seed, seed 0). A row is "
                 "paired with the full row on the seeds both have; where those are fewer than the full row's, the "
                 "full row's runs on them are shown too (\"(full), seed 0\").", ""]
        for table in ABLATION_TABLES:
            lines += self.ablation(table)
        return lines

    @cached_property
    def component_checks(self) -> list[ComponentCheck]:
        """Every recorded ComLoRA run with all its components evaluated: those tagged table10 first (MAIN first)."""
        names = sorted(self.runs, key=lambda n: ("table10" not in self.experiments[n].tables, n != MAIN, n))
        return [ComponentCheck(run, "table10" in self.experiments[name].tables) for name in names
                for run in self.recorded(name)
                if run.winner and len(run.components()) > 1]

    @cached_property
    def table10_outcome(self) -> tuple[list[ComponentCheck], int, float, int, str] | None:
        """Over the table10 runs with a selector: (checks, k winners best, P(>= k by chance), lowest validation loss
        best, verdict); None before any such run is recorded."""
        checks = [c for c in self.component_checks if c.outside_the_claim is None]
        if not checks:
            return None
        k = sum(c.winner_is_best for c in checks)
        p = at_least_k_successes(k, [c.chance for c in checks])
        by_loss = sum(bool(set(c.lowest_val_loss) & set(c.best)) for c in checks if c.lowest_val_loss)
        return checks, k, p, by_loss, chance_verdict(p)

    @cached_property
    def figure2_outcomes(self) -> list[tuple[str, str, LossComparison | None, str]]:
        """Figure 2's claim per pair of FIGURE2_PAIRS: (ComLoRA, LoRA, comparison or None, verdict)."""
        outcomes = []
        for comlora, lora in FIGURE2_PAIRS:
            seeds = self.common_seeds(comlora, lora)
            if not seeds:
                outcomes.append((comlora, lora, None, self.not_measured(comlora, lora)))
                continue
            c = loss_comparison([self.runs[comlora][s] for s in seeds], [self.runs[lora][s] for s in seeds],
                                self.runs[comlora][seeds[0]].window)
            outcomes.append((comlora, lora, c, "not measured (no training step in both runs' metrics.jsonl)"
                             if c is None else c.verdict()))
        return outcomes

    @cached_property
    def figure3_outcome(self) -> tuple[list[ComponentCheck], int, float, int, str] | None:
        """Figure 3's claim over Table 10's runs: (checks, k runs whose winner had the lowest loss most often in the
        last window, P(>= k by chance), runs where the winner's share rose from the first window to the last,
        verdict)."""
        checks = [c for c in (self.table10_outcome or [[]])[0] if c.dominant_at_the_end]
        if not checks:
            return None
        k = sum(c.winner in c.dominant_at_the_end for c in checks)
        p = at_least_k_successes(k, [len(c.dominant_at_the_end) / len(c.components) for c in checks])
        rose = sum(first[c.winner] / sum(first.values()) < last[c.winner] / sum(last.values())
                   for c in checks for first, last in [c.lowest_loss_windows])
        return checks, k, p, rose, chance_verdict(p)

    def claims_tested(self) -> str:
        """How many claims the page tests, and which."""
        figure2 = " and ".join(f"{self.label(a)} against {self.label(b)}" for a, b in FIGURE2_PAIRS)
        return (f"{len(self.paper['claims']) + 1 + len(FIGURE2_PAIRS) + 1} tests of the paper's claims here "
                f"({len(self.paper['claims'])} paired comparisons of accuracy, Table 10's count of winners, Figure 2's "
                f"claim on training loss ({figure2}) and Figure 3's count of winners)")

    def figure_claims(self) -> list[str]:
        """Figure 2's claim per pair (a table) and Figure 3's claim (a sentence)."""
        rows = []
        blocks = " or ".join(sorted({str(c.block) for _, _, c, _ in self.figure2_outcomes if c is not None}))
        for comlora, lora, c, result in self.figure2_outcomes:
            cells = (["–"] * 5 if c is None else
                     [seeds_text(c.seeds), f"{c.every_lower} of {c.steps}",
                      f"{c.difference:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
                      ", ".join(f"{x:+.3f}" for x in c.per_seed), p_text(c.p_bootstrap)])
            rows.append([self.label(comlora), self.label(lora), *cells, f"**{result}**"])
        lines = ["The paper's Figure 2 claim (ComLoRA K=4, r=4 against LoRA r=4 and r=16: \"the training losses of "
                 "all LoRA components in ComLoRA are consistently lower than those of LoRAs\"): at each training step, "
                 "the same batch in both runs of a seed, LoRA's loss minus the highest of the components' losses "
                 "(> 0: every component lower), its mean over the steps and per seed. The steps of one run are "
                 "not independent draws (the adapters carry over), so the interval and p come from a moving-block "
                 f"bootstrap: each seed's steps redrawn in blocks of {blocks or 'the window of Figure 3'} "
                 f"consecutive steps (Figure 3's window), {RESAMPLES:,} resamples. The paper's setting is the first "
                 "row; the second is ours.", ""]
        lines += markdown_table(["ComLoRA", "LoRA", "seeds", "steps with every component lower",
                                 "LoRA − highest component, mean [95% CI]", "per seed", "p (bootstrap)", "verdict"],
                                rows)
        lines += self.gradient_norms()
        claim = ("The paper's Figure 3 claim (one component gradually gains dominance, having the lowest training loss "
                 "most often, and ends as the winner; tested here: its last part)")
        outcome = self.figure3_outcome
        if outcome is None:
            return lines + ["", f"{claim}: not measured yet (no run of Table 10's claim with its training metrics)."]
        checks, k, p, rose, result = outcome
        return lines + ["", f"{claim}, over the {len(checks)} runs of Table 10's claim: the selector's winner had the "
                        f"lowest loss most often (or tied most often) in the last window of steps in {k} of "
                        f"{len(checks)} runs; by chance a component is so with probability |most often| / K in each "
                        f"run ({', '.join(f'{len(c.dominant_at_the_end) / len(c.components):.2f}' for c in checks)}), "
                        f"so P(at least {k} of {len(checks)}) = {p_text(p)}: **{result}**. The winner's share of the "
                        f"lowest-loss steps rose from the first window to the last in {rose} of {len(checks)} runs."]

    def gradient_norms(self) -> list[str]:
        """Figure 2's pairs' median gradient norm before clipping (metrics.jsonl grad_norm), and the clipping norm."""
        parts, clip = [], set()
        for comlora, lora, c, _ in self.figure2_outcomes:
            if c is None:
                continue
            runs = {name: [self.runs[name][s] for s in c.seeds] for name in (comlora, lora)}
            norms = {name: [step["grad_norm"] for r in rs for step in r.training_steps if "grad_norm" in step]
                     for name, rs in runs.items()}
            if not all(norms.values()):
                continue
            clip |= {r.max_grad_norm for rs in runs.values() for r in rs}
            parts.append(f"{self.label(comlora)} {statistics.median(norms[comlora]):.2f} against {self.label(lora)} "
                         f"{statistics.median(norms[lora]):.2f}")
        if not parts or len(clip) != 1 or not next(iter(clip)):
            return []
        return ["", f"The gradient norm before clipping (median over the steps of the seeds with `grad_norm` in "
                f"metrics.jsonl): {'; '.join(parts)}. Every step clips the whole gradient, the selector's and the "
                f"components' together, to norm {next(iter(clip)):g} (`bench/grad_norm_split.py` splits a run's norm "
                "into the selector's and the components'). AdamW's update is unchanged by a constant "
                "rescaling of the gradient, but not by one that changes from step to step, as ComLoRA's clipping "
                "factor does; whether that slows the components' loss is not tested here."]

    def table10_claim(self) -> list[str]:
        claim = "The paper's Table 10 claim (the selector's winner is the best component on the test items)"
        outcome = self.table10_outcome
        if outcome is None:
            missing = "; ".join(self.missing([MAIN])) or "component evaluations"
            return [f"{claim}: not measured yet (missing: {missing})."]
        checks, k, p, by_loss, verdict = outcome
        n = len(checks)
        experiments = plural(len({c.run.experiment for c in checks}), "experiment")
        return [f"{claim}, over the runs of the experiments tagged table10, the method as specified with K and r "
                f"varied ({n} runs of {experiments}; the ablations' components, where evaluated, are shown in Table 10 "
                f"but not counted): the winner was the best (or tied best) component "
                f"in {k} of {n}; a component picked at random is best with probability |best| / K in each run "
                f"({', '.join(f'{c.chance:.2f}' for c in checks)}), so P(at least {k} of {n} by chance) = {p_text(p)}: "
                f"**{verdict}**. For comparison, the component with the lowest validation loss was the best in "
                f"{by_loss} of {n}.{self.table10_margins(checks)}"]

    def table10_margins(self, checks: list[ComponentCheck]) -> str:
        """The winner's lead over the best other component on the test items, over the runs of the claim."""
        gaps = [c.against_best_other for c in checks if c.against_best_other is not None]
        if not gaps:
            return ""
        alone = ("none of them significant on its own run's items (each p ≥ "
                 f"{p_text(min(g.p_bootstrap for g in gaps))})" if all(g.p_bootstrap >= ALPHA for g in gaps) else
                 f"{sum(g.p_bootstrap < ALPHA for g in gaps)} of {len(gaps)} significant on their run's items")
        return (f" The winner's lead over the best other component was {signed(min(g.difference for g in gaps))} to "
                f"{signed(max(g.difference for g in gaps))} points, {alone}: the claim is about which component the "
                "selector picks, not about how much better it is.")

    def table10(self) -> list[str]:
        every = [n for n, e in self.experiments.items() if e.components == "all"]
        lines = ["## Table 10: every component of the ComLoRA runs", ""] + self.missing_line(every)
        checks = self.component_checks
        rows, summary = [], []
        for check in checks:
            run, val_loss = check.run, check.run.winner.get("val_loss")
            for k, result in check.components.items():
                rows.append([self.label(run.experiment), run.seed, f"{k}{' **(winner)**' if k == check.winner else ''}",
                             *[f"{result['tasks'][t]['accuracy']:.1f}" for t, _ in TASKS], f"{result['average']:.1f}",
                             f"{val_loss[k]:.4f}" if val_loss else "–"])
            gap = check.against_best_other
            by_similarity, by_loss = run.winner.get("winner_by_similarity"), run.winner.get("winner_by_loss")
            summary.append([self.label(run.experiment), run.seed, len(check.components), check.winner,
                            "–" if by_similarity is None else by_similarity, "–" if by_loss is None else by_loss,
                            ", ".join(map(str, check.best)), "yes" if check.winner_is_best else "no",
                            "–" if not val_loss else ("yes" if check.winner in check.lowest_val_loss else "no"),
                            "–" if gap is None else f"{gap.interval()}, p {p_text(gap.p_bootstrap)}",
                            check.outside_the_claim and f"no: {check.outside_the_claim}" or "yes"])
        if checks:
            lines += ["Every component of every recorded run whose experiment sets `components: all` (an experiment "
                      "tagged table10 must); the other experiments evaluate their winner only.", ""]
            lines += markdown_table(["run", "seed", "component", *[c for _, c in TASKS], "average", "validation loss"],
                                    rows)
            lines += ["", "The winner is the selector's pick (`winner.json`; the lowest validation loss where there is "
                      "no selector); the validation loss is each component's on the validation items.", ""]
            lines += markdown_table(["run", "seed", "K", "winner", "by selector", "by validation loss",
                                     "best on the test items", "winner best on test?", "winner lowest validation loss?",
                                     "winner − best other, points [95% CI], p", "in the claim"], summary)
            lines.append("")
        paper = self.paper["tables"]["table10"]
        lines += [f"The paper's Table 10 ({paper['setting']}, LLaMA-3-8B):", ""]
        lines += markdown_table(["component", *[c for _, c in TASKS], "average"],
                                [[r["row"], *paper_cells(r)] for r in paper["rows"]])
        return lines + ["", "The paper's claim on this table is tested under the verdicts above.", ""]

    def figures(self, page: Path, figures: Path) -> list[str]:
        from comlora.plots import plot_loss_curves, plot_lowest_loss_share

        drawn = " and ".join(f"{self.label(a)} beside {self.label(b)}"
                             for a, b in FIGURE2_PAIRS if a in self.experiments)
        lines = ["## Figures 2 and 3", "",
                 f"The paper draws them for ComLoRA K=4, r=4 beside LoRA r=4 and r=16; here for {drawn or 'no run'}, "
                 "per seed. Their claims are tested under the verdicts above.", ""]
        for comlora, lora in FIGURE2_PAIRS:
            if comlora not in self.experiments:
                continue
            lines += [f"### {self.label(comlora)}", ""] + self.missing_line([comlora, lora])
            prefix = "" if comlora == MAIN else f"{comlora}-"
            for run in self.recorded(comlora):
                if not (run.path / "metrics.jsonl").is_file():
                    lines += [f"Seed {run.seed}: no figure, `{run.path / 'metrics.jsonl'}` is missing.", ""]
                    continue
                figures.mkdir(parents=True, exist_ok=True)
                curves = {f"{self.label(comlora)} seed {run.seed}": run.path}
                other = self.runs.get(lora, {}).get(run.seed)
                if other is not None and (other.path / "metrics.jsonl").is_file():
                    curves[f"{self.label(lora)} seed {run.seed}"] = other.path
                window = run.window
                fig2 = plot_loss_curves(curves, figures / f"figure2-{prefix}seed{run.seed}.png")
                fig3 = plot_lowest_loss_share(run.path, figures / f"figure3-{prefix}seed{run.seed}.png", window)
                lines += [f"Seed {run.seed}: Figure 2 (training loss of each component"
                          f"{', beside ' + self.label(lora) if len(curves) > 1 else ''}) and Figure 3 (share of the "
                          f"steps of each window of {window} at which each component had the lowest loss).", "",
                          f"![Figure 2, seed {run.seed}]({os.path.relpath(fig2, page.parent)}) "
                          f"![Figure 3, seed {run.seed}]({os.path.relpath(fig3, page.parent)})", ""]
        return lines

    def early_decision(self) -> list[str]:
        def order(name: str) -> tuple:
            train = self.experiments[name].train or {}
            decide = (train.get("method_options") or {}).get("decide_at")
            return (train.get("method") == "comlora", 1.0 if decide is None else decide, name)

        names = sorted(self.tagged("decide"), key=order)
        lines = ["## Beyond the paper: the early decision (`decide_at`)", ""]
        if not names:
            return lines + ["No experiment of the study is tagged decide.", ""]
        lines += self.missing_line(names)
        rows, loads = [], {}
        for name in names:
            runs = self.recorded(name)
            records = [r.record for r in runs]
            timed = [r for r in records if r.get("load_average_start") and r.get("load_average_end")]
            loads.update({(name, r["seed"]): (r["load_average_start"][0] + r["load_average_end"][0]) / 2 for r in timed})
            decided = sorted({r.decision["decided_at_step"] for r in runs if r.decision})
            steps = "/".join(map(str, sorted({r["steps"] for r in records if r.get("steps")})))
            against = [self.paired(name, other) if name != other else None for other in (MAIN, LORA_R8)]
            medians = [r.median_step_seconds() for r in runs]
            ratios = [alone / competing for competing, alone in medians if competing and alone]
            rows.append([self.label(name), len(runs), mean_std([r.result["average"] for r in runs]),
                         f"{', '.join(map(str, decided))} of {steps}" if decided else "–",
                         mean_std([r["train_seconds"] for r in records if r.get("train_seconds") is not None], 0),
                         mean_std([r["tokens_per_s"] for r in records if r.get("tokens_per_s") is not None], 0),
                         mean_std([p for p in (r.base_passes_per_token() for r in runs) if p is not None], 2),
                         " / ".join(mean_std([m[phase] for m in medians if m[phase] is not None]) for phase in (0, 1)),
                         mean_std(ratios, 2),
                         ", ".join(f"{r['load_average_start'][0]:.1f}→{r['load_average_end'][0]:.1f}"
                                   for r in timed) or "–",
                         *["–" if c is None else f"{c.interval()}, p {p_text(c.p_bootstrap)}" for c in against]])
        lines += markdown_table(["run", "seeds", "average accuracy", "decided at step", "training wall time (s)",
                                 "tokens/s", "base-model passes per training token",
                                 "median s/step: competing / one adapter", "one adapter ÷ competing, same run",
                                 "load average (1 min) start→end, per seed", f"Δ vs {self.label(MAIN)}",
                                 f"Δ vs {self.label(LORA_R8)}"], rows)
        lines += ["", "Wall time and tokens/s as `run.json` records them (the training command's wall time; tokens/s "
                  "averaged over the optimizer steps). Base-model passes per training token: the training compute "
                  "whatever the machine's load, from `metrics.jsonl` (K while the components compete, 1 for LoRA and after the "
                  "decision; the decision's one validation pass is not counted). Median s/step: of `metrics.jsonl`'s "
                  "step_seconds, over the steps at which the components competed and over those at which one adapter "
                  "trained (LoRA, or ComLoRA after the decision), averaged over seeds; their ratio is taken within each "
                  "run, so the load of the other runs affects it less than the wall times. Δ: points [95% CI], "
                  "bootstrap p, paired on the seeds both have."]
        if loads:
            cpus = max((r.record.get("cpus") or 1) for name in names for r in self.recorded(name))
            low, high = min(loads.values()), max(loads.values())
            if high - low > cpus / 2:
                lines.append(f"**The recorded load averages differ a lot** (each run's mean of start and end: from "
                             f"{low:.1f} to {high:.1f} on {cpus} CPUs): the machine was shared, and wall times and "
                             "tokens/s measured under different load are not comparable; compare the accuracies, and "
                             "the timings only roughly.")
            else:
                lines.append(f"The recorded load averages (each run's mean of start and end) range from {low:.1f} to "
                             f"{high:.1f} on {cpus} CPUs; timings "
                             "are comparable only under similar load.")
        return lines + [""]

    def run_list(self) -> list[str]:
        rows = []
        for name in sorted(self.runs):
            for run in self.recorded(name):
                rec = run.record
                rows.append([f"`{run.source}`", rec.get("date", "–"), f"`{str(rec.get('commit', 'unknown'))[:12]}`",
                             f"{rec['train_seconds']:.0f}" if rec.get("train_seconds") is not None else "–",
                             f"{rec['eval_seconds']:.0f}" if rec.get("eval_seconds") is not None else "–",
                             rec.get("steps", "–")])
        lines = ["## Recorded runs", ""]
        if not rows:
            return lines + ["None yet.", ""]
        records = [run.record for name in self.runs for run in self.recorded(name)]
        train, evaluate = (sum(rec.get(key) or 0.0 for rec in records) for key in ("train_seconds", "eval_seconds"))
        return lines + markdown_table(["run", "started", "commit", "train s", "eval s", "steps"], rows) + [
            "", f"In all, the {len(records)} recorded runs took {train / 3600:.1f} h of training and "
            f"{evaluate / 3600:.1f} h of evaluation, summed over the runs (runs that ran at the same time each count "
            "in full).", ""]

    def markdown(self, page: Path, figures: Path, command: str) -> str:
        sections = [self.header(command), self.summary(), self.verdicts(), self.table3(), self.fixed_answer(),
                    self.paired_lora(), self.ablations(), self.table10(), self.figures(page, figures),
                    self.early_decision(), self.run_list()]
        return "\n".join(line for section in sections for line in section).rstrip() + "\n"


def load_paper(path: Path) -> dict:
    """The paper's numbers (experiments/study/paper-numbers.json), checked: 8 task values per row, claims whose
    rows exist and whose paper averages go the claimed way."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the paper's numbers are missing (experiments/study/{PAPER_FILE})")
    paper = read_json(path)
    for key in ("tables", "claims"):
        if key not in paper:
            raise ValueError(f"{path}: no {key!r}")
    for name, table in paper["tables"].items():
        for row in table["rows"]:
            if len(row.get("tasks", [])) != len(TASKS) or "average" not in row:
                raise ValueError(f"{path}: {name} row {row.get('row')!r} needs {len(TASKS)} task values and an average")
    for claim in paper["claims"]:
        better = paper_average(paper, claim["table"], claim["better"])
        than = paper_average(paper, claim["table"], claim["than"])
        if better <= than:
            raise ValueError(f"{path}: claim {claim['claim']!r}: the paper's {claim['table']} has {better} for "
                             f"{claim['better']} and {than} for {claim['than']}, not the claimed order")
    return paper


def paper_average(paper: dict, table: str, experiment: str) -> float:
    rows = [r for r in paper["tables"].get(table, {}).get("rows", []) if r["experiment"] == experiment]
    if len(rows) != 1:
        raise ValueError(f"the paper's numbers: {table} has {len(rows)} rows for experiment {experiment!r} (need one)")
    return rows[0]["average"]


def write_report(experiments: str | Path, results: str | Path, out: str | Path, figures: str | Path,
                 paper: str | Path | None = None, command: str | None = None) -> Path:
    """Build the page from the recorded runs and write it (and the figures) atomically."""
    out, figures = Path(out), Path(figures)
    command = command or (f"comlora study-report --experiments {experiments} --results {results} --out {out} "
                          f"--figures {figures}")
    report = StudyReport(experiments, results, paper)
    write_text(out, report.markdown(out, figures, command))
    return out

"""The recorded study, loaded and checked: the experiments of a study folder (experiments/study/*.yaml), the runs
``comlora study`` recorded for them (``RESULTS/<experiment>/seed-<s>/``, see experiments.py) and the paper's numbers
(``paper-numbers.json``), with lookups by experiment name."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from comlora.evaluation.commonsense import ANSWER_PATTERNS
from comlora.evaluation.results import parse_component_label
from comlora.storage import read_json
from comlora.study.experiments import Experiment, load_experiments
from comlora.training.config import TrainConfig, load_yaml

PAPER_FILE = "paper-numbers.json"
TASK_COLUMNS = {"boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "ARC-Challenge": "ARC-c",
                "ARC-Easy": "ARC-e", "openbookqa": "OBQA", "hellaswag": "HellaS", "winogrande": "WinoG"}
TASKS = [(task, TASK_COLUMNS[task]) for task in ANSWER_PATTERNS]      # the commonsense tasks, as the paper's columns


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


class AnswerHabits(NamedTuple):
    """How a run answers, averaged over the tasks (answer_habits)."""

    same: float                    # % of a task's items given the run's most common prediction for that task
    none: float                    # % of the items whose response had no answer


def answer_habits(result: dict) -> AnswerHabits:
    """(same answer %, no answer %) averaged over the tasks: the share of a task's items given the run's most common
    prediction for that task (no answer counted as one), and the share of items whose response had no answer."""
    tasks = [result["tasks"][task]["items"] for task, _ in TASKS]
    same = statistics.mean(most_common_share([item["prediction"] for item in items]) for items in tasks)
    none = statistics.mean(100 * sum(item["prediction"] is None for item in items) / len(items) for items in tasks)
    return AnswerHabits(same, none)


def base_passes_per_token(steps: list[dict]) -> float | None:
    """Training compute independent of the machine's load: sum_t P_t * n_t / sum_t n_t over the optimizer steps
    of a run's metrics.jsonl, where n_t is the step's target tokens and P_t the number of components that ran the base
    model on them (len(component_loss) while ComLoRA competes, else 1). LoRA and a decided run: 1 per step. None
    without steps, or for metrics of older code (no target_tokens)."""
    if not steps or any("target_tokens" not in s for s in steps):
        return None
    tokens = sum(s["target_tokens"] for s in steps)
    passes = [len(s["component_loss"]) if "component_loss" in s else 1 for s in steps]
    return sum(p * s["target_tokens"] for p, s in zip(passes, steps)) / tokens if tokens else None


class StepSeconds(NamedTuple):
    """Median seconds per optimizer step of one run (None: the run has no such step)."""

    competing: float | None        # while ComLoRA's components competed
    alone: float | None            # one adapter: LoRA, or ComLoRA after its early decision


class RunFolder:
    """What a recorded run's folder gives both studies: needs ``experiment``, ``seed``, ``path`` and ``config``."""

    @property
    def source(self) -> str:
        return f"{self.experiment}/seed-{self.seed}"

    @property
    def window(self) -> int:
        """Steps per window of Figure 3 (config.yaml's window, else TrainConfig's default)."""
        return int((self.config or {}).get("window") or TrainConfig.window)

    @cached_property
    def training_steps(self) -> list[dict]:
        """The optimizer steps of metrics.jsonl (none for the base model), read once."""
        from comlora.plots import read_metrics

        return read_metrics(self.path) if (self.path / "metrics.jsonl").is_file() else []

    def base_passes_per_token(self) -> float | None:
        """base_passes_per_token of its metrics.jsonl."""
        return base_passes_per_token(self.training_steps)


@dataclass
class RecordedRun(RunFolder):
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
        winners = [n for n in self.evals if (c := parse_component_label(n)) is not None and c.winner]
        names = winners or list(self.evals)
        if len(names) != 1:
            raise ValueError(f"{self.path / 'eval'}: expected one commonsense evaluation of the "
                             f"{'winner' if winners else 'run'}, found {sorted(self.evals)}")
        return self.evals[names[0]]

    @property
    def max_grad_norm(self) -> float:
        """The clipping norm it trained with (config.yaml's, else TrainConfig's default)."""
        return float((self.config or {}).get("max_grad_norm", TrainConfig.max_grad_norm))

    @cached_property
    def habits(self) -> AnswerHabits:
        """answer_habits of its evaluation."""
        return answer_habits(self.result)

    def median_step_seconds(self) -> StepSeconds:
        """The median of metrics.jsonl's step_seconds over the steps at which ComLoRA's components competed (those
        with component_loss), and over the others (LoRA, or ComLoRA after its decision)."""
        timed = [s for s in self.training_steps if "step_seconds" in s]
        competing = [s["step_seconds"] for s in timed if "component_loss" in s]
        alone = [s["step_seconds"] for s in timed if "component_loss" not in s]
        return StepSeconds(statistics.median(competing) if competing else None,
                           statistics.median(alone) if alone else None)

    def components(self) -> dict[int, dict]:
        """ComLoRA component index -> its evaluation (``components: all`` runs have one per component)."""
        out = {}
        for name, result in self.evals.items():
            found = parse_component_label(name)
            if found is not None:
                out[found.component] = result
        return dict(sorted(out.items()))


def load_run(experiment: str, seed: int, path: Path) -> RecordedRun:
    optional = {name: read_json(path / f"{name}.json") if (path / f"{name}.json").is_file() else None
                for name in ("parameters", "winner", "decision")}
    evals = {f.stem: read_json(f) for f in sorted((path / "eval").glob("commonsense-*.json"))}
    if not evals:
        raise ValueError(f"{path}: recorded (run.json) but has no eval/commonsense-*.json")
    config = load_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else None
    return RecordedRun(experiment=experiment, seed=seed, path=path, record=read_json(path / "run.json"), config=config,
                       evals=evals, **optional)


class Recorded(NamedTuple):
    """What load_recorded finds in a results folder."""

    runs: dict[str, dict[int, RecordedRun]]      # experiment -> seed -> run, for the planned (experiment, seed)s
    unplanned: list[str]                         # recorded folders no experiment plans, as <experiment>/seed-<s>


def load_recorded(results: Path, experiments: list[Experiment]) -> Recorded:
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
    return Recorded(runs, unplanned)


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


class StudyRecords:
    """A study folder's experiments, the runs recorded for them in ``results`` and the paper's numbers (by default
    ``<experiments>/paper-numbers.json``), with lookups by experiment name."""

    def __init__(self, experiments_dir: str | Path, results: str | Path, paper_file: str | Path | None = None):
        self.experiments_dir, self.results = Path(experiments_dir), Path(results)
        self.base, experiments = load_experiments(self.experiments_dir)
        self.experiments = {e.name: e for e in experiments}
        self.runs, self.unplanned = load_recorded(self.results, experiments)
        self.paper_file = Path(paper_file) if paper_file else self.experiments_dir / PAPER_FILE
        self.paper = load_paper(self.paper_file)

    def tagged(self, table: str) -> list[str]:
        """The experiments tagged ``table`` (a table of the paper, figures, decide), by name."""
        return sorted(n for n, e in self.experiments.items() if table in e.tables)

    def label(self, name: str) -> str:
        return self.experiments[name].label if name in self.experiments else name

    def recorded(self, name: str) -> list[RecordedRun]:
        """The recorded runs of experiment ``name``, by seed."""
        return [self.runs[name][s] for s in sorted(self.runs.get(name, {}))]

    def common_seeds(self, a: str, b: str) -> list[int]:
        return sorted(set(self.runs.get(a, {})) & set(self.runs.get(b, {})))

    def missing(self, names: list[str]) -> list[str]:
        """The planned runs of ``names`` not yet recorded (and names no experiment file defines), one Markdown
        fragment per experiment."""
        out = []
        for name in names:
            if name not in self.experiments:
                out.append(f"`{name}` (no experiment file)")
                continue
            seeds = [s for s in self.experiments[name].seeds if s not in self.runs[name]]
            if seeds:
                out.append(f"`{name}` seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
        return out

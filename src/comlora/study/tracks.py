"""Study II's records, loaded and checked: its tracks (each a subfolder of ``experiments/study2`` holding a base.yaml
and experiment files, see experiments.py) and the runs ``comlora study`` recorded for them
(``RESULTS/<experiment>/seed-<s>/``, one results folder for every track), each with its teacher-forced evaluation
(``eval/<name>/<task>-loglik-<label>.json``, the track's ``--scoring loglik`` evaluation; one file per component for
``components: all``), its generated evaluation if the track has one (ConvAI2's ``generate``:
``eval/<name>/<task>-<label>.json``, the winner's), winner.json and metrics.jsonl."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from comlora.evaluation.results import parse_component_label
from comlora.storage import read_json
from comlora.study.experiments import BASE_FILE, Experiment, load_evaluations, load_experiments, train_config
from comlora.study.records import RunFolder
from comlora.study.statistics import PairedDifference, paired_accuracy_difference, paired_nll_difference
from comlora.training.config import TrainConfig, load_yaml

CONVAI2, COMMONSENSE = "convai2", "commonsense"
TRACK_TASKS = (CONVAI2, COMMONSENSE)
PILOT = "pilot"                    # the tag of a track's pilot experiments
SUPERSEDED = "superseded"          # the tag of a given-up track's experiments (kept as recorded, not costed)


@dataclass
class TrackRun(RunFolder):
    """One recorded (experiment, seed) of a track: run.json, config.yaml, its loglik evaluation, and what Study II's
    results read besides: every component's loglik file, the generated evaluation, winner.json, metrics.jsonl."""

    experiment: str
    seed: int
    path: Path
    record: dict                   # run.json
    config: dict | None            # config.yaml (None: the base model, nothing trained)
    result: dict                   # the loglik evaluation (the winner's for ComLoRA)
    result_file: Path
    component_files: dict[int, Path] = field(default_factory=dict)   # component -> its loglik file (ComLoRA)
    generated: dict | None = None  # the generated evaluation (the winner's; None: the track or run has none)
    generated_file: Path | None = None
    winner: dict | None = None     # winner.json (None: no selector)

    def hours(self, key: str) -> float | None:
        """run.json's ``train_seconds`` or ``eval_seconds`` in hours (None: not recorded, the base model's training)."""
        seconds = self.record.get(key)
        return None if seconds is None else seconds / 3600


def chosen_result(folder: Path, pattern: str) -> Path:
    """The run's evaluation among ``folder``'s files matching ``pattern``: the winner's where the files name
    components, else the one file."""
    files = sorted(folder.glob(pattern))
    winners = [f for f in files if (c := parse_component_label(f.stem)) is not None and c.winner]
    chosen = winners or files
    if len(chosen) != 1:
        raise ValueError(f"{folder}: expected one {pattern} of the {'winner' if winners else 'run'}, "
                         f"found {[f.name for f in files]}")
    return chosen[0]


def loglik_result(folder: Path, task: str) -> Path:
    """The run's loglik evaluation in ``folder``: the winner's where the files name components, else the one file."""
    return chosen_result(folder, f"{task}-loglik-*.json")


def load_track_run(experiment: str, seed: int, path: Path, evaluation: str, task: str,
                   generation: str | None = None) -> TrackRun:
    """The run's records; ``generation``: the name of the track's generated evaluation (None: it has none)."""
    result_file = loglik_result(path / "eval" / evaluation, task)
    result = read_json(result_file)
    if result.get("settings", {}).get("scoring") != "loglik":
        raise ValueError(f"{result_file}: not a loglik evaluation (settings.scoring is "
                         f"{result.get('settings', {}).get('scoring')!r})")
    config = load_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else None
    components = {c.component: f for f in sorted((path / "eval" / evaluation).glob(f"{task}-loglik-*.json"))
                  if (c := parse_component_label(f.stem)) is not None}
    generated_dir = path / "eval" / generation if generation else None
    generated_file = (chosen_result(generated_dir, f"{task}-*.json")
                      if generated_dir is not None and generated_dir.is_dir() else None)
    generated = read_json(generated_file) if generated_file else None
    if generated is not None and generated.get("settings", {}).get("scoring", "generate") != "generate":
        raise ValueError(f"{generated_file}: not a generated evaluation (settings.scoring is "
                         f"{generated['settings']['scoring']!r})")
    winner = read_json(path / "winner.json") if (path / "winner.json").is_file() else None
    return TrackRun(experiment, seed, path, read_json(path / "run.json"), config, result, result_file, components,
                    generated, generated_file, winner)


def flag_value(flags: list[str], flag: str) -> str | None:
    """The value after ``flag`` in ``comlora eval`` flags (None: not given)."""
    return flags[flags.index(flag) + 1] if flag in flags[:-1] else None


def generation_evaluation(folder: Path, task: str) -> str | None:
    """The name of the track's evaluation of ``task`` by generation (no --scoring loglik) in base.yaml, None if it has
    none; two are refused."""
    found = [name for name, flags in load_evaluations(folder).items()
             if name is not None and flag_value(flags, "--task") == task and flag_value(flags, "--scoring") != "loglik"]
    if len(found) > 1:
        raise ValueError(f"{folder / BASE_FILE}: more than one evaluation of --task {task} by generation: {found}")
    return found[0] if found else None


def loglik_task(folder: Path) -> tuple[str, str]:
    """(evaluation name, task) of the track's one ``--scoring loglik`` evaluation in base.yaml."""
    found = [(name, flags[flags.index("--task") + 1]) for name, flags in load_evaluations(folder).items()
             if name is not None and "--scoring" in flags and flags[flags.index("--scoring") + 1:][:1] == ["loglik"]
             and "--task" in flags[:-1]]
    if len(found) != 1 or found[0][1] not in TRACK_TASKS:
        raise ValueError(f"{folder / BASE_FILE}: a Study II track needs one evaluation with --scoring loglik and "
                         f"--task {' or '.join(TRACK_TASKS)}, found {found}")
    return found[0]


class Track:
    """One track of Study II: its experiments (by name) and the runs recorded for them."""

    def __init__(self, folder: Path, results: Path):
        self.folder, self.name = folder, folder.name
        self.evaluation, self.task = loglik_task(folder)
        self.generation = generation_evaluation(folder, self.task)
        self.base, experiments = load_experiments(folder)
        self.experiments: dict[str, Experiment] = {e.name: e for e in experiments}
        self.runs: dict[str, dict[int, TrackRun]] = {name: {} for name in self.experiments}
        for name, exp in self.experiments.items():
            for seed in exp.seeds:
                path = results / name / f"seed-{seed}"
                if (path / "run.json").is_file():
                    self.runs[name][seed] = load_track_run(name, seed, path, self.evaluation, self.task,
                                                           self.generation)

    @property
    def title(self) -> str:
        """The task's name, and the folder's where it is not the task's (a second track of the task)."""
        title = {CONVAI2: "ConvAI2", COMMONSENSE: "Commonsense"}[self.task]
        return title if self.name == self.task else f"{title} ({self.name})"

    @property
    def superseded(self) -> bool:
        """Every experiment of the track is tagged superseded: a protocol given up, its runs kept as recorded."""
        return all(SUPERSEDED in e.tables for e in self.experiments.values())

    def tagged(self, tag: str) -> list[str]:
        return [n for n, e in self.experiments.items() if tag in e.tables]

    def recorded(self, name: str) -> list[TrackRun]:
        return [self.runs[name][s] for s in sorted(self.runs.get(name, {}))]

    def planned(self, names: list[str]) -> int:
        return sum(len(self.experiments[n].seeds) for n in names)

    def missing(self, names: list[str]) -> list[str]:
        """The planned runs of ``names`` not yet recorded, one Markdown fragment per experiment."""
        out = []
        for name in names:
            seeds = [s for s in self.experiments[name].seeds if s not in self.runs[name]]
            if seeds:
                out.append(f"`{name}` seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
        return out

    def config(self, name: str) -> TrainConfig | None:
        """The experiment's TrainConfig as the study resolves it (None: the base model)."""
        exp = self.experiments[name]
        return None if exp.train is None else train_config(self.base, exp, exp.seeds[0], "check")

    def training_items(self, name: str) -> float:
        """Items one epoch trains on: ConvAI2's train_size (inf for 0, all turns), commonsense's train_per_task times
        the tasks; 0 for the base model."""
        cfg = self.config(name)
        if cfg is None:
            return 0
        if self.task == CONVAI2:
            return cfg.train_size or math.inf
        return cfg.train_per_task * (len(cfg.tasks) if cfg.tasks else 8)

    def size_text(self, name: str) -> str:
        """The experiment's training size in words: '1,000 turns', '200 per task (1,600 items)'."""
        cfg, items = self.config(name), self.training_items(name)
        if cfg is None:
            return "none"
        if self.task == CONVAI2:
            return "all turns" if math.isinf(items) else f"{items:,} turns"
        return f"{cfg.train_per_task:,} per task ({items:,} items)"

    def is_lora_r8(self, name: str) -> bool:
        train = self.experiments[name].train or {}
        return train.get("method") == "lora" and train.get("r") == 8

    def clip_grad(self, name: str | None = None) -> tuple[str, float]:
        """(clip_grad, max_grad_norm) of base.yaml, or of experiment ``name`` over it (TrainConfig's defaults where
        neither sets them)."""
        values = {**self.base, **((self.experiments[name].train or {}) if name else {})}
        return (values.get("clip_grad", TrainConfig.clip_grad),
                float(values.get("max_grad_norm", TrainConfig.max_grad_norm)))

    @cached_property
    def base_model(self) -> str | None:
        """The pilot's base-model experiment (the one tagged pilot that trains nothing), None if there is none."""
        names = [n for n in self.tagged(PILOT) if self.experiments[n].train is None]
        if len(names) > 1:
            raise ValueError(f"{self.folder}: more than one pilot experiment trains nothing: {names}")
        return names[0] if names else None

    def primary(self, run: TrackRun) -> tuple[float, float]:
        """The run's (primary, secondary) metric from its items: ConvAI2 (sum nll / sum tokens, its exp);
        commonsense (acc_norm, acc), each 100 * the share of a task's items correct, averaged over the tasks."""
        if self.task == CONVAI2:
            items = run.result["items"]
            nll = sum(i["nll"] for i in items) / sum(i["tokens"] for i in items)
            return nll, math.exp(nll)
        tasks = run.result["tasks"].values()
        return tuple(sum(100 * sum(i["correct"][m] for i in t["items"]) / len(t["items"]) for t in tasks) / len(tasks)
                     for m in ("acc_norm", "acc"))

    def against(self, run: TrackRun, base: TrackRun) -> PairedDifference:
        """``run`` against ``base`` on the same test items (> 0: ``run`` is better): the NLL per token for ConvAI2,
        acc_norm in points for commonsense (statistics.paired_*_difference). Items that are not the same in both
        (by dialogue and turn, or task and index) are refused."""
        if self.task == CONVAI2:
            a, b = turns(run), turns(base)
            same = a.keys() == b.keys() and all(a[k][1] == b[k][1] for k in a)
            if not same:
                raise ValueError(f"{run.result_file} and {base.result_file}: not the same test turns and tokens "
                                 f"({len(a)} and {len(b)} turns, {len(a.keys() ^ b.keys())} not in both)")
            keys = sorted(a)
            return paired_nll_difference([b[k][0] for k in keys], [a[k][0] for k in keys], [a[k][1] for k in keys])
        a, b = choices(run), choices(base)
        if a.keys() != b.keys() or any(a[k][1] != b[k][1] for k in a):
            raise ValueError(f"{run.result_file} and {base.result_file}: not the same items ({len(a)} and {len(b)} "
                             f"items, {len(a.keys() ^ b.keys())} not in both)")
        keys = sorted(a)
        return paired_accuracy_difference([a[k][0] for k in keys], [b[k][0] for k in keys])


def keyed(pairs: list[tuple[tuple, tuple]], source: Path) -> dict[tuple, tuple]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError(f"{source}: an item appears twice")
    return out


def turns(run: TrackRun) -> dict[tuple, tuple[float, int]]:
    """(dialogue, turn) -> (nll, tokens) of a ConvAI2 evaluation."""
    return keyed([((i["dialogue"], i["turn"]), (i["nll"], i["tokens"])) for i in run.result["items"]], run.result_file)


def choices(run: TrackRun) -> dict[tuple, tuple[bool, int]]:
    """(task, index) -> (correct under acc_norm, answer_index) of a commonsense evaluation."""
    return keyed([((task, i["index"]), (i["correct"]["acc_norm"], i["answer_index"]))
                  for task, t in run.result["tasks"].items() for i in t["items"]], run.result_file)


class Study2Records:
    """Study II's tracks (the subfolders of ``experiments_dir`` with a base.yaml) and their recorded runs."""

    def __init__(self, experiments_dir: str | Path, results: str | Path):
        self.experiments_dir, self.results = Path(experiments_dir), Path(results)
        if not self.experiments_dir.is_dir():
            raise FileNotFoundError(f"{self.experiments_dir}: no Study II folder (its tracks' experiment files)")
        tracks = [Track(d, self.results) for d in sorted(self.experiments_dir.iterdir()) if (d / BASE_FILE).is_file()]
        self.tracks = sorted(tracks, key=lambda t: TRACK_TASKS.index(t.task))        # ConvAI2 first
        if not self.tracks:
            raise ValueError(f"{self.experiments_dir}: no track (a subfolder with {BASE_FILE} and experiment files)")
        names = [n for t in self.tracks for n in t.experiments]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{self.experiments_dir}: experiments named alike in two tracks: {twice} (their runs "
                             "share one results folder)")
        planned = {f"{n}/seed-{s}" for t in self.tracks for n, e in t.experiments.items() for s in e.seeds}
        recorded = sorted(self.results.glob("*/seed-*/run.json")) if self.results.is_dir() else []
        self.unplanned = [name for f in recorded if (name := f"{f.parent.parent.name}/{f.parent.name}") not in planned]

"""The reproduction study (``comlora study``): every experiment of ``experiments/study/*.yaml`` times
its seeds, each trained and evaluated in its own process, skipping what is recorded and resuming what a
kill interrupted (training from its checkpoint, an evaluation of every component from the first component
without a result). One experiment file:

    label: ComLoRA (2, 8)            # the row's name in the tables
    tables: [table3, table6]         # the tables (and figures) it appears in
    seeds: [0, 1, 2]
    priority: 1                      # lower runs first
    components: all                  # evaluate every component (Table 10) or only the winner
    train: {method: comlora, num_components: 2, r: 8}     # TrainConfig values over base.yaml; null = base model

The folder's base.yaml may name the evaluations every run gets (Study II), each with its ``comlora eval`` flags:

    evaluations:
      loglik: [--task, convai2, --scoring, loglik]
      generate: [--task, convai2, --greedy, --limit, 300, --components, winner]

Each writes its result files into its own ``eval/<name>/`` folder. Without the key a run gets Study I's one
evaluation, ``EVAL_FLAGS`` on the commonsense suite, written into ``eval/``.

Per run, ``RESULTS/<experiment>/seed-<s>/`` receives (atomically, when the run is complete): the resolved
config.yaml, metrics.jsonl, winner.json / validation.json / decision.json, parameters.json, every
``comlora eval`` result file (each item's response, prediction and answer), and run.json (seed, commit,
commands, wall times, tokens/s, load average). The machine's work folder is written there as ``<study-work>``,
so a record names no local path.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from comlora.evaluation.results import component_label
from comlora.methods.registry import get_method
from comlora.storage import write_json, write_text
from comlora.training.config import TrainConfig, load_yaml

BASE_FILE = "base.yaml"
TIMING_INTERVAL = 30              # seconds between the runner's writes of a running command's wall time
EVAL_FLAGS = ["--greedy", "--max-new-tokens", "16", "--batch-size", "8"]
RUN_FILES = ("config.yaml", "metrics.jsonl", "winner.json", "validation.json", "decision.json", "parameters.json")
WORK_PLACEHOLDER = "<study-work>"
RUNNING: set[subprocess.Popen] = set()    # the commands running now: a SIGTERM to the study does not reach them itself
RUNNING_LOCK = threading.Lock()
ENDING = threading.Event()                # set by a SIGTERM to the study: no command starts after it


@dataclass
class Experiment:
    name: str
    label: str
    tables: list[str]
    seeds: list[int]
    priority: int
    components: str
    train: dict | None


def load_evaluations(folder: str | Path) -> dict[str | None, list[str]]:
    """{name: ``comlora eval`` flags} of base.yaml's ``evaluations``; Study I's {None: EVAL_FLAGS} without it (the
    name None writes into ``eval/`` itself)."""
    path = Path(folder) / BASE_FILE
    evaluations = load_yaml(path).get("evaluations")
    if evaluations is None:
        return {None: EVAL_FLAGS}
    if not isinstance(evaluations, dict) or not evaluations or not all(
            isinstance(name, str) and re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) and isinstance(flags, list)
            and all(isinstance(f, (str, int, float)) for f in flags) for name, flags in evaluations.items()):
        raise ValueError(f"{path}: evaluations must map names (lower-case letters, digits, - and _) to lists of "
                         f"`comlora eval` flags, got {evaluations!r}")
    out = {name: [str(f) for f in flags] for name, flags in evaluations.items()}
    for name, flags in out.items():
        try:
            own_components(flags)
        except ValueError as e:
            raise ValueError(f"{path}: evaluation {name}: {e}") from None
    return out


def evaluation_dir(eval_root: Path, name: str | None) -> Path:
    return eval_root if name is None else eval_root / name


def load_experiments(folder: str | Path) -> tuple[dict, list[Experiment]]:
    """(base TrainConfig values, experiments) of a study folder; every file is checked before anything runs."""
    folder = Path(folder)
    base = load_yaml(folder / BASE_FILE)
    base.pop("evaluations", None)
    load_evaluations(folder)
    experiments = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name == BASE_FILE:
            continue
        values = load_yaml(path)
        unknown = set(values) - {"label", "tables", "seeds", "priority", "components", "train"}
        if unknown or "label" not in values or "tables" not in values:
            raise ValueError(f"{path}: an experiment needs label and tables (and may have seeds, priority, components, "
                             f"train); unknown keys {sorted(unknown)}")
        exp = Experiment(name=path.stem, label=values["label"], tables=list(values["tables"]),
                         seeds=list(values.get("seeds", [0])), priority=int(values.get("priority", 9)),
                         components=values.get("components", "winner"), train=values.get("train"))
        if exp.components not in ("winner", "all"):
            raise ValueError(f"{path}: components must be winner or all, got {exp.components!r}")
        if "table10" in exp.tables and exp.components != "all":
            raise ValueError(f"{path}: an experiment of Table 10 evaluates every component: set components: all")
        if exp.train is not None:
            train_config(base, exp, exp.seeds[0], "check")       # a bad option fails now, not hours later
        experiments.append(exp)
    if not experiments:
        raise ValueError(f"{folder}: no experiment file (*.yaml besides {BASE_FILE})")
    return base, experiments


def train_config(base: dict, exp: Experiment, seed: int, out: str | Path) -> TrainConfig:
    values = {**base, **exp.train, "seed": seed, "out": str(out)}
    values["method_options"] = {**base.get("method_options", {}), **exp.train.get("method_options", {})}
    return TrainConfig.from_dict(values)


def code_commit() -> str:
    """The git commit of the code that runs (the checkout this package is imported from)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def portable(text: str, work_root: Path) -> str:
    """``text`` with every mention of the study's work folder ``work_root`` written as ``<study-work>``."""
    for root in sorted({str(work_root), str(work_root.resolve())}, key=len, reverse=True):
        text = text.replace(root, WORK_PLACEHOLDER)
    return text


def record_file(source: Path, target: Path, work_root: Path) -> None:
    """Copy the text file ``source`` to ``target`` with the work folder written as ``<study-work>``."""
    write_text(target, portable(source.read_text(), work_root))


def run_command(argv: list[str], log: Path, threads: str | None = None,
                elapsed: Callable[[float], None] | None = None) -> float:
    """Run ``python -m comlora ARGV`` (its output appended to ``log``; ``threads``: its OMP_NUM_THREADS, None to
    inherit); returns its wall time in seconds. ``elapsed`` receives the wall time so far every TIMING_INTERVAL
    seconds and once at the end, failed or not, so a kill of the study itself loses at most one interval."""
    started = time.perf_counter()
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": threads}
    with log.open("a") as f:
        f.write(f"$ comlora {' '.join(argv)}\n")
        f.flush()
        with RUNNING_LOCK:
            if ENDING.is_set():
                raise RuntimeError(f"`comlora {' '.join(argv)}` not started: the study was sent SIGTERM")
            process = subprocess.Popen([sys.executable, "-m", "comlora", *argv], stdout=f, stderr=subprocess.STDOUT,
                                       env=env)
            RUNNING.add(process)
        try:
            while True:
                try:
                    process.wait(timeout=TIMING_INTERVAL)
                    break
                except subprocess.TimeoutExpired:
                    if elapsed:
                        elapsed(time.perf_counter() - started)
        finally:
            with RUNNING_LOCK:
                RUNNING.discard(process)
            if process.poll() is None:          # the study itself was interrupted: its command goes with it
                process.kill()
                process.wait()
            if elapsed:
                elapsed(time.perf_counter() - started)
    if process.returncode > 0:
        raise RuntimeError(f"`comlora {' '.join(argv)}` failed (exit {process.returncode}); see {log}")
    if process.returncode < 0:
        name = signal.Signals(-process.returncode).name
        hint = (": the kernel's out-of-memory killer sends it when memory runs out; run fewer jobs at a time (--jobs) "
                "or lower the run's memory (gradient_checkpointing, ComLoRA's competition: low_memory)"
                if -process.returncode == signal.SIGKILL else "")
        raise RuntimeError(f"`comlora {' '.join(argv)}` was killed by {name}{hint}; see {log}. Running the study "
                           "again resumes it from its last checkpoint")
    return time.perf_counter() - started


def own_components(flags: list[str]) -> tuple[str | None, list[str]]:
    """An evaluation's own ``--components`` value (None: it has none, the experiment's holds) and its other flags."""
    if "--components" not in flags:
        return None, flags
    at = flags.index("--components")
    if at + 1 == len(flags) or flags[at + 1] not in ("winner", "all"):
        raise ValueError(f"evaluation flags {flags}: --components takes winner or all")
    return flags[at + 1], flags[:at] + flags[at + 2:]


def missing_evaluations(run: Path, exp: Experiment, cfg: TrainConfig,
                        evaluations: dict[str | None, list[str]] | None = None) -> list[list[str]]:
    """The ``comlora eval`` commands a trained run still needs, for each evaluation (default: Study I's): under
    ``components: all`` (the experiment's, or the evaluation's own ``--components`` flag), for a method that selects
    a winner, one per component without its result file (each file is written whole when its component is done, so
    a kill loses at most the component being evaluated); otherwise one for the winner (or the run) unless its file
    exists."""
    commands = []
    for name, flags in (evaluations or {None: EVAL_FLAGS}).items():
        folder = evaluation_dir(run / "eval", name)
        out = [] if name is None else ["--out", str(folder)]
        have = [p.name for p in folder.glob("*.json")]
        components, flags = own_components(flags)
        components = components or exp.components
        if components == "all" and get_method(cfg.method).selects_winner:
            def done(k: int, have: list[str] = have) -> bool:
                return any(n.endswith(f"-{component_label(run.name, k, winner)}.json") for n in have
                           for winner in (False, True))
            commands += [["eval", "--run", str(run), "--components", str(k), *flags, *out]
                         for k in range(cfg.num_components) if not done(k)]
        elif not have:
            commands.append(["eval", "--run", str(run), "--components", components, *flags, *out])
    return commands


def run_one(base: dict, exp: Experiment, seed: int, work_root: Path, results: Path, threads: str | None = None,
            evaluations: dict[str | None, list[str]] | None = None) -> Path:
    """Train (or resume) and evaluate one experiment at one seed in ``work_root/<experiment>/seed-<s>`` (its
    processes with OMP_NUM_THREADS ``threads``, None to inherit; ``evaluations`` as ``load_evaluations`` gives them,
    default Study I's); record it in ``results``."""
    work = work_root / exp.name / f"seed-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "study.log"
    evaluations = evaluations or {None: EVAL_FLAGS}
    record = {"experiment": exp.name, "label": exp.label, "seed": seed, "commit": code_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
              "omp_num_threads": threads or os.environ.get("OMP_NUM_THREADS"), "load_average_start": os.getloadavg(),
              "commands": []}
    record.update({"eval_flags": EVAL_FLAGS} if None in evaluations else {"evaluations": evaluations})
    timing_file = work / "train_seconds.json"
    if exp.train is None:
        eval_dir = work / "eval"
        for name, flags in evaluations.items():
            folder = evaluation_dir(eval_dir, name)
            if not any(folder.glob("*.json")):
                argv = ["eval", "--model", base.get("model", "smollm2-135m"),
                        "--seed", str(base.get("data_seed", seed)),
                        *(["--eval-size", str(base["eval_size"])] if "eval_size" in base else []), "--out", str(folder),
                        *own_components(flags)[1]]
                record["commands"].append("comlora " + " ".join(argv))
                record["eval_seconds"] = record.get("eval_seconds", 0.0) + run_command(argv, log, threads)
    else:
        run = work / "run"
        cfg = train_config(base, exp, seed, run)
        config_file = work / "train.yaml"
        write_text(config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if not (run / "state").is_dir():
            resume = (run / "config.yaml").is_file()
            argv = ["train", "--config", str(config_file)] + (["--resume"] if resume else [])
            record["commands"].append("comlora " + " ".join(argv))
            timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {"seconds": 0.0, "segments": 0}
            previous, segments = timing["seconds"], timing.get("segments", 1 if timing["seconds"] else 0) + 1
            run_command(argv, log, threads, lambda seconds: write_json(
                timing_file, {"seconds": previous + seconds, "segments": segments, "resumed": resume or None}))
        record["train_seconds"] = json.loads(timing_file.read_text())["seconds"] if timing_file.is_file() else None
        eval_timing = work / "eval_seconds.json"
        evaluated = json.loads(eval_timing.read_text()) if eval_timing.is_file() else {"seconds": 0.0, "commands": []}
        for argv in missing_evaluations(run, exp, cfg, evaluations):
            previous = evaluated["seconds"]
            evaluated["commands"].append("comlora " + " ".join(argv))

            def elapsed(seconds: float, previous: float = previous) -> None:
                evaluated["seconds"] = previous + seconds
                write_json(eval_timing, evaluated)
            run_command(argv, log, threads, elapsed)
        record["commands"] += evaluated["commands"]
        record["eval_seconds"] = evaluated["seconds"] if evaluated["commands"] else None
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        record["tokens_per_s"] = sum(m["tokens_per_s"] for m in metrics) / len(metrics)
        record["steps"] = len(metrics)
        eval_dir = run / "eval"
    record["load_average_end"] = os.getloadavg()

    final = results / exp.name / f"seed-{seed}"
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "eval").mkdir(parents=True)
    if exp.train is not None:
        for name in RUN_FILES:
            if (work / "run" / name).is_file():
                record_file(work / "run" / name, tmp / name, work_root)
    for name in evaluations:
        for f in sorted(evaluation_dir(eval_dir, name).glob("commonsense-*.json" if name is None else "*.json")):
            record_file(f, evaluation_dir(tmp / "eval", name) / f.name, work_root)
    record["commands"] = [portable(command, work_root) for command in record["commands"]]
    write_json(tmp / "run.json", record)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


@contextmanager
def claimed(work: Path) -> Iterator[bool]:
    """An exclusive claim on a run's work folder while this process runs it (an flock on ``.study-lock``, which the
    kernel drops when the process ends, killed or not): True, or False when another study holds it."""
    work.mkdir(parents=True, exist_ok=True)
    with (work / ".study-lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield True


def end_on_sigterm(stop: threading.Event) -> Callable[[int, object], None]:
    """A SIGTERM handler ending the study as Ctrl-C does: nothing more starts, each running command gets SIGTERM
    (so its runner writes its time and the study's threads end), and the study exits with status 128 + 15."""
    def handler(signum: int, frame: object) -> None:
        stop.set()
        with RUNNING_LOCK:
            ENDING.set()
            for process in RUNNING:
                process.terminate()
        raise SystemExit(128 + signum)
    return handler


def run_study(folder: str | Path, work: str | Path, results: str | Path, only: list[str] | None = None,
              max_runs: int | None = None, jobs: int = 1) -> list[Path]:
    """Every (experiment, seed) not yet recorded in ``results``, by priority, then seed position, then name;
    ``jobs`` of them at a time, each with OMP_NUM_THREADS = CPUs // jobs unless the environment sets it. The
    first failure stops the study: runs not yet started are not started, the others finish. A SIGTERM stops it
    at once (``end_on_sigterm``), leaving no command behind. Studies started side by side on the same folders share
    the work: each skips the runs another has claimed (``claimed``) or recorded (None in the returned list)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1 (runs at a time), got {jobs!r}")
    base, experiments = load_experiments(folder)
    evaluations = load_evaluations(folder)
    if only:
        unknown = sorted(set(only) - {e.name for e in experiments})
        if unknown:
            raise ValueError(f"--only: no experiment named {unknown}; known: {sorted(e.name for e in experiments)}")
        experiments = [e for e in experiments if e.name in only]
    units = sorted(((e, s, i) for e in experiments for i, s in enumerate(e.seeds)),
                   key=lambda u: (u[0].priority, u[2], u[0].name))
    results, work = Path(results), Path(work)
    todo = [(e, s) for e, s, _ in units if not (results / e.name / f"seed-{s}" / "run.json").is_file()]
    print(f"study: {len(units)} runs, {len(units) - len(todo)} recorded, {len(todo)} to do"
          f"{f', {jobs} at a time' if jobs > 1 else ''}", flush=True)
    threads = None if jobs == 1 or os.environ.get("OMP_NUM_THREADS") else str(max(1, (os.cpu_count() or 1) // jobs))

    stop = threading.Event()                     # set by the first failure (or Ctrl-C): start nothing more
    say_lock = threading.Lock()                  # print writes the line and its newline apart: threads interleave them

    def say(line: str) -> None:
        with say_lock:
            print(line, flush=True)

    def one(exp: Experiment, seed: int) -> Path | None:
        if stop.is_set():
            return None
        with claimed(work / exp.name / f"seed-{seed}") as mine:
            if not mine or (results / exp.name / f"seed-{seed}" / "run.json").is_file():
                say(f"study: {exp.name} seed {seed} skipped: "
                    f"{'another study is running it' if not mine else 'another study recorded it'}")
                return None
            say(f"study: {exp.name} seed {seed} ({exp.label}) started {time.strftime('%H:%M:%S')}")
            try:
                recorded = run_one(base, exp, seed, work, results, threads, evaluations)
            except BaseException:
                stop.set()
                raise
        say(f"study: {exp.name} seed {seed} recorded in {recorded}")
        return recorded

    in_main_thread = threading.current_thread() is threading.main_thread()   # only there can it take signals
    ENDING.clear()
    previous = signal.signal(signal.SIGTERM, end_on_sigterm(stop)) if in_main_thread else None
    try:
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(one, exp, seed) for exp, seed in todo[:max_runs]]
            try:
                for future in as_completed(futures):
                    future.result()              # the first failure raises; leaving the pool waits for the running runs
            except BaseException:
                stop.set()
                raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return [future.result() for future in futures]

"""The study runner on a tiny model: records every run completely, skips what is recorded, resumes a killed run."""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from comlora.study.experiments import load_experiments, run_study


def write_study(folder, tiny_model_dir, commonsense_root):
    folder.mkdir()
    base = dict(model=str(tiny_model_dir), data_root=str(commonsense_root), data_seed=0, train_per_task=4, val_size=4,
                eval_size=3, batch_size=4, grad_accum=1, lr=0.01, save_every=2, device="cpu",
                method_options={"selector_heads": 4, "selector_ffn_dim": 32})
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    (folder / "base-model.yaml").write_text(yaml.safe_dump(
        {"label": "Base", "tables": ["table3"], "seeds": [0], "priority": 1, "train": None}))
    (folder / "comlora.yaml").write_text(yaml.safe_dump(
        {"label": "ComLoRA", "tables": ["table3"], "seeds": [0, 1], "priority": 2, "components": "all",
         "train": {"method": "comlora", "num_components": 2, "r": 4}}))
    return folder


def test_study_records_skips_and_resumes(tmp_path, tiny_model_dir, commonsense_root, monkeypatch):
    monkeypatch.setenv("COMLORA_DATA", str(commonsense_root))
    study = write_study(tmp_path / "study", tiny_model_dir, commonsense_root)
    results, work = tmp_path / "results", tmp_path / "work"
    done = run_study(study, work, results, max_runs=2)
    assert [p.relative_to(results).as_posix() for p in done] == ["base-model/seed-0", "comlora/seed-0"]
    run = results / "comlora" / "seed-0"
    record = json.loads((run / "run.json").read_text())
    assert record["seed"] == 0 and record["train_seconds"] > 0 and record["steps"] == 8 and record["commit"]
    assert {"config.yaml", "metrics.jsonl", "winner.json", "parameters.json"} <= {p.name for p in run.iterdir()}
    evals = sorted(p.name for p in (run / "eval").iterdir())
    assert len(evals) == 2 and sum("-winner" in name for name in evals) == 1        # both components evaluated
    items = json.loads((run / "eval" / evals[0]).read_text())["tasks"]["boolq"]["items"]
    assert len(items) == 3 and {"response", "prediction", "answer"} <= set(items[0])
    base_items = json.loads(next((results / "base-model" / "seed-0" / "eval").iterdir()).read_text())
    assert [i["index"] for i in base_items["tasks"]["boolq"]["items"]] == [i["index"] for i in items]   # same items

    # seed 1 killed after its first checkpoint: the study resumes it instead of starting over
    from comlora.training.config import TrainConfig
    from comlora.training.loop import train
    _, experiments = load_experiments(study)
    from comlora.study.experiments import train_config
    exp = next(e for e in experiments if e.name == "comlora")
    train(train_config(yaml.safe_load((study / "base.yaml").read_text()), exp, 1, work / "comlora" / "seed-1" / "run"),
          stop_after=2)
    assert run_study(study, work, results) == [results / "comlora" / "seed-1"]
    log = (work / "comlora" / "seed-1" / "study.log").read_text()
    assert "--resume" in log
    assert json.loads((results / "comlora" / "seed-1" / "run.json").read_text())["steps"] == 8
    assert run_study(study, work, results) == []                                    # everything is recorded
    assert isinstance(TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text())), TrainConfig)

    # a record names no local path: the work folder is written as <study-work>
    recorded = [p for p in results.rglob("*") if p.is_file()]
    assert recorded and not [p for p in recorded if str(work) in p.read_text()]
    assert record["commands"][0].startswith("comlora train --config <study-work>/comlora/seed-0/train.yaml")
    assert yaml.safe_load((run / "config.yaml").read_text())["out"] == "<study-work>/comlora/seed-0/run"
    eval_settings = json.loads(next((run / "eval").iterdir()).read_text())["settings"]
    assert eval_settings["run"] == "<study-work>/comlora/seed-0/run"


def test_a_bad_experiment_file_fails_before_anything_runs(tmp_path, tiny_model_dir, commonsense_root):
    study = write_study(tmp_path / "study", tiny_model_dir, commonsense_root)
    (study / "broken.yaml").write_text(yaml.safe_dump({"label": "x", "tables": ["t"], "train": {"methd": "lora"}}))
    with pytest.raises(ValueError, match="unknown field"):
        run_study(study, tmp_path / "work", tmp_path / "results")
    (study / "broken.yaml").write_text(yaml.safe_dump({"label": "x", "tables": ["table10"], "components": "winner",
                                                      "train": {"method": "comlora"}}))
    with pytest.raises(ValueError, match="broken.yaml: an experiment of Table 10 evaluates every component"):
        run_study(study, tmp_path / "work", tmp_path / "results")
    assert not (tmp_path / "work").exists()


def write_base_model_study(folder, names_and_priorities):
    folder.mkdir()
    (folder / "base.yaml").write_text(yaml.safe_dump(dict(model="tiny", eval_size=3, data_seed=0)))
    for name, priority in names_and_priorities:
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(
            {"label": name, "tables": ["table3"], "seeds": [0], "priority": priority, "train": None}))
    return folder


def fake_eval(calls, on_call):
    """A stand-in for ``run_command`` on base-model runs: records (experiment, threads), runs ``on_call``, writes
    an evaluation file into the run's --out folder."""
    def run_command(argv, log, threads=None):
        out = Path(argv[argv.index("--out") + 1])
        experiment = out.parent.parent.name
        calls.append((experiment, threads))
        on_call(experiment)
        out.mkdir(parents=True, exist_ok=True)
        (out / "commonsense-base.json").write_text(json.dumps({"tasks": {}, "average": 0.0}))
        return 0.5
    return run_command


def test_study_jobs_run_at_the_same_time_with_their_share_of_threads(tmp_path, monkeypatch, capsys):
    import comlora.study.experiments as runner

    study = write_base_model_study(tmp_path / "study", [("a", 1), ("b", 1), ("c", 2)])
    both_running = threading.Barrier(2, timeout=60)        # broken (an error) unless a and b run at the same time
    calls = []
    monkeypatch.setattr(runner, "run_command",
                        fake_eval(calls, lambda name: both_running.wait() if name in ("a", "b") else None))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    results = tmp_path / "results"
    done = run_study(study, tmp_path / "work", results, jobs=2)
    assert [p.relative_to(results).as_posix() for p in done] == ["a/seed-0", "b/seed-0", "c/seed-0"]
    assert sorted(calls) == [("a", "2"), ("b", "2"), ("c", "2")]                  # 4 CPUs // 2 jobs
    lines = capsys.readouterr().out.splitlines()                                   # whole lines, never two run together
    assert len(lines) == 7 and all(line.count("study:") == 1 for line in lines)
    for name in "abc":
        record = json.loads((results / name / "seed-0" / "run.json").read_text())
        assert record["omp_num_threads"] == "2"
        assert (results / name / "seed-0" / "eval" / "commonsense-base.json").is_file()

    monkeypatch.setenv("OMP_NUM_THREADS", "3")                                     # the environment's value wins
    calls.clear()
    run_study(write_base_model_study(tmp_path / "study2", [("d", 1)]), tmp_path / "work", results, jobs=2)
    assert calls == [("d", None)]
    assert json.loads((results / "d" / "seed-0" / "run.json").read_text())["omp_num_threads"] == "3"


def test_a_failed_run_stops_the_study_and_the_running_runs_finish(tmp_path, monkeypatch):
    import comlora.study.experiments as runner

    study = write_base_model_study(tmp_path / "study", [("a", 1), ("b", 1), ("c", 2), ("d", 3)])
    both_running = threading.Barrier(2, timeout=60)

    def on_call(name):
        if name in ("a", "b"):
            both_running.wait()
        if name == "a":
            raise RuntimeError("`comlora eval ...` failed (exit 1)")
        time.sleep(0.5)                                                            # b ends after a has failed

    calls = []
    monkeypatch.setattr(runner, "run_command", fake_eval(calls, on_call))
    results = tmp_path / "results"
    with pytest.raises(RuntimeError, match="failed"):
        run_study(study, tmp_path / "work", results, jobs=2)
    assert sorted(name for name, _ in calls) == ["a", "b"]                         # c and d never started
    assert (results / "b" / "seed-0" / "run.json").is_file() and not (results / "a").exists()
    assert sorted(p.name for p in results.iterdir()) == ["b"]

    for jobs in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="jobs must be an integer >= 1"):
            run_study(study, tmp_path / "work", results, jobs=jobs)


def fake_python(tmp_path, monkeypatch, body: str) -> None:
    """Make the runner's ``sys.executable -m comlora ARGV`` a shell script running ``body``."""
    import comlora.study.experiments as runner

    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    monkeypatch.setattr(runner.sys, "executable", str(script))


def test_run_command_gives_the_process_its_threads(tmp_path, monkeypatch):
    import comlora.study.experiments as runner

    fake_python(tmp_path, monkeypatch, 'echo "threads=${OMP_NUM_THREADS:-unset} kept=$KEPT"')
    monkeypatch.setenv("KEPT", "yes")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runner.run_command(["--version"], tmp_path / "log", "2")
    runner.run_command(["--help"], tmp_path / "log")        # None: the environment inherited unchanged
    assert (tmp_path / "log").read_text() == ("$ comlora --version\nthreads=2 kept=yes\n"
                                              "$ comlora --help\nthreads=unset kept=yes\n")


def test_run_command_names_the_failure_and_the_signal_that_killed_the_process(tmp_path, monkeypatch):
    import comlora.study.experiments as runner

    for body, message in [("exit 2", r"`comlora train --config x` failed \(exit 2\)"),
                          ("kill -9 $$", r"killed by SIGKILL: the kernel's out-of-memory killer .* \(--jobs\)"),
                          ("kill -15 $$", r"killed by SIGTERM; see .*log\. Running the study again resumes it")]:
        fake_python(tmp_path, monkeypatch, body)
        seen = []
        with pytest.raises(RuntimeError, match=message):
            runner.run_command(["train", "--config", "x"], tmp_path / "log", elapsed=seen.append)
        assert len(seen) == 1 and seen[0] >= 0                                      # a failure's time is kept


def test_run_command_reports_its_time_while_it_runs_and_when_the_study_is_interrupted(tmp_path, monkeypatch):
    import comlora.study.experiments as runner

    monkeypatch.setattr(runner, "TIMING_INTERVAL", 0.05)
    fake_python(tmp_path, monkeypatch, "sleep 0.5")
    seen = []
    seconds = runner.run_command(["train"], tmp_path / "log", elapsed=seen.append)
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] == pytest.approx(seconds, abs=0.01) and seconds >= 0.5

    fake_python(tmp_path, monkeypatch, f"echo $$ > {tmp_path / 'pid'}; sleep 30")
    calls = []

    def interrupt_once_running(value):
        calls.append(value)
        if len(calls) == 2:                                   # as a Ctrl-C (or a kill) of the study would
            raise KeyboardInterrupt
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        runner.run_command(["train"], tmp_path / "log", elapsed=interrupt_once_running)
    assert time.perf_counter() - started < 10 and len(calls) == 3 and calls[2] >= calls[1]   # the time so far kept
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()  # not left behind


def test_a_sigterm_to_the_study_ends_its_running_command_keeps_its_time_and_starts_nothing(
        tmp_path, tiny_model_dir, commonsense_root, monkeypatch):
    import comlora.study.experiments as runner

    monkeypatch.setattr(runner, "TIMING_INTERVAL", 0.05)
    fake_python(tmp_path, monkeypatch, f"echo $$ > {tmp_path / 'pid'}; exec sleep 30")
    study = write_study(tmp_path / "study", tiny_model_dir, commonsense_root)
    results, work = tmp_path / "results", tmp_path / "work"
    before = signal.getsignal(signal.SIGTERM)

    def terminate_the_study_once_training_runs():
        while not (tmp_path / "pid").exists():
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)               # as `kill <study>` or a scheduler's stop would
    threading.Thread(target=terminate_the_study_once_training_runs, daemon=True).start()
    started = time.perf_counter()
    with pytest.raises(SystemExit) as ended:
        run_study(study, work, results, only=["comlora"])  # seeds 0 and 1, one at a time
    assert ended.value.code == 128 + signal.SIGTERM and time.perf_counter() - started < 10
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()  # not left behind
    timing = json.loads((work / "comlora" / "seed-0" / "train_seconds.json").read_text())
    assert timing["segments"] == 1 and timing["seconds"] >= 0.3                         # its time written at the end
    assert not (work / "comlora" / "seed-1").exists() and not results.exists()          # nothing more started
    assert signal.getsignal(signal.SIGTERM) is before                                   # the handler is put back


def test_studies_side_by_side_skip_the_runs_another_claimed_or_recorded(tmp_path, tiny_model_dir, commonsense_root,
                                                                        monkeypatch, capsys):
    import fcntl

    import comlora.study.experiments as runner

    study = write_study(tmp_path / "study", tiny_model_dir, commonsense_root)
    results, work = tmp_path / "results", tmp_path / "work"
    ran = []

    def record(name, seed):
        (results / name / f"seed-{seed}").mkdir(parents=True)
        (results / name / f"seed-{seed}" / "run.json").write_text("{}")
        return results / name / f"seed-{seed}"

    def run_one(base, exp, seed, work_root, results, threads=None, evaluations=None):
        ran.append((exp.name, seed, (work_root / exp.name / f"seed-{seed}" / ".study-lock").read_text()))
        return record(exp.name, seed)
    monkeypatch.setattr(runner, "run_one", run_one)
    claim = work / "comlora" / "seed-0"
    claim.mkdir(parents=True)
    with (claim / ".study-lock").open("a+") as other:           # another study is running comlora seed 0
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_study(study, work, results, only=["comlora"]) == [None, results / "comlora" / "seed-1"]
    assert ran == [("comlora", 1, f"{os.getpid()}\n")]                    # the claim names the study that holds it
    assert "comlora seed 0 skipped: another study is running it" in capsys.readouterr().out

    def run_one_while_another_records_seed_1(base, exp, seed, work_root, results, threads=None, evaluations=None):
        ran.append((exp.name, seed))
        record("comlora", 1)                                    # the other study finishes seed 1 meanwhile
        return record(exp.name, seed)
    monkeypatch.setattr(runner, "run_one", run_one_while_another_records_seed_1)
    (results / "comlora").rename(tmp_path / "set-aside")        # neither seed recorded when the study starts
    ran.clear()
    assert run_study(study, work, results, only=["comlora"]) == [results / "comlora" / "seed-0", None]
    assert ran == [("comlora", 0)] and "comlora seed 1 skipped: another study recorded it" in capsys.readouterr().out


def test_a_killed_training_segment_keeps_its_time_and_the_next_adds_to_it(tmp_path, tiny_model_dir, commonsense_root,
                                                                         monkeypatch):
    import comlora.study.experiments as runner

    study = write_study(tmp_path / "study", tiny_model_dir, commonsense_root)
    base, experiments = load_experiments(study)
    exp = next(e for e in experiments if e.name == "comlora")

    def killed_after(seconds):
        def run_command(argv, log, threads=None, elapsed=None):
            (tmp_path / "work" / "comlora" / "seed-0" / "run").mkdir(exist_ok=True)
            (tmp_path / "work" / "comlora" / "seed-0" / "run" / "config.yaml").write_text("{}")
            elapsed(seconds / 2)
            elapsed(seconds)
            raise RuntimeError("killed by SIGKILL")
        return run_command
    timing = tmp_path / "work" / "comlora" / "seed-0" / "train_seconds.json"
    for seconds, total, segments, resumed in [(5.0, 5.0, 1, None), (7.0, 12.0, 2, True)]:
        monkeypatch.setattr(runner, "run_command", killed_after(seconds))
        with pytest.raises(RuntimeError, match="SIGKILL"):
            runner.run_one(base, exp, 0, tmp_path / "work", tmp_path / "results")
        assert json.loads(timing.read_text()) == {"seconds": total, "segments": segments, "resumed": resumed}


def test_a_killed_evaluation_resumes_at_the_first_component_without_a_result(tmp_path, tiny_model_dir,
                                                                              commonsense_root, monkeypatch):
    from comlora.cli import main
    from comlora.study.experiments import train_config
    from comlora.training.loop import train

    monkeypatch.setenv("COMLORA_DATA", str(commonsense_root))
    study = write_study(tmp_path / "study", tiny_model_dir, commonsense_root)
    results, work = tmp_path / "results", tmp_path / "work"
    _, experiments = load_experiments(study)
    exp = next(e for e in experiments if e.name == "comlora")
    run = work / "comlora" / "seed-0" / "run"
    train(train_config(yaml.safe_load((study / "base.yaml").read_text()), exp, 0, run))
    # the kill came while component 1 was being evaluated: component 0's file is whole, component 1 has none
    main(["eval", "--run", str(run), "--components", "0", "--greedy", "--max-new-tokens", "16", "--batch-size", "8"])
    first = next((run / "eval").glob("commonsense-run-component0*.json"))
    before = first.read_bytes()

    assert run_study(study, work, results, only=["comlora"], max_runs=1) == [results / "comlora" / "seed-0"]
    log = (work / "comlora" / "seed-0" / "study.log").read_text()
    assert "--components 1 " in log and "--components 0" not in log and "comlora train" not in log
    assert first.read_bytes() == before                                      # not evaluated again
    recorded = results / "comlora" / "seed-0"
    evals = sorted(p.name for p in (recorded / "eval").iterdir())
    assert [re.sub(r"-winner", "", n) for n in evals] == ["commonsense-run-component0.json",
                                                          "commonsense-run-component1.json"]
    assert sum("-winner" in n for n in evals) == 1
    record = json.loads((recorded / "run.json").read_text())
    assert record["commands"] == ["comlora eval --run <study-work>/comlora/seed-0/run --components 1 --greedy "
                                  "--max-new-tokens 16 --batch-size 8"]
    assert record["eval_seconds"] > 0
    # both components' results are what one `--components all` evaluation writes
    main(["eval", "--run", str(run), "--components", "all", "--greedy", "--max-new-tokens", "16", "--batch-size", "8",
          "--out", str(tmp_path / "all")])
    for name in evals:
        again = json.loads((tmp_path / "all" / name).read_text())
        kept = json.loads((recorded / "eval" / name).read_text())
        assert again["tasks"] == kept["tasks"] and again["average"] == kept["average"]


def test_named_evaluations_each_write_and_record_their_own_folder(tmp_path, tiny_model_dir, commonsense_root,
                                                                  monkeypatch):
    """Study II's base.yaml names its evaluations: each runs for the base model and for every component of a run
    (or only the winner, given its own --components), lands in eval/<name>/, is recorded there, and is skipped once
    its files exist."""
    monkeypatch.setenv("COMLORA_DATA", str(commonsense_root))
    study = write_study(tmp_path / "study", tiny_model_dir, commonsense_root)
    base = yaml.safe_load((study / "base.yaml").read_text())
    base["evaluations"] = {"short": ["--greedy", "--max-new-tokens", 2],
                           "first": ["--greedy", "--limit", 1, "--components", "winner"]}
    (study / "base.yaml").write_text(yaml.safe_dump(base))
    results, work = tmp_path / "results", tmp_path / "work"
    done = run_study(study, work, results, max_runs=2)
    assert [p.relative_to(results).as_posix() for p in done] == ["base-model/seed-0", "comlora/seed-0"]
    for run, files in (("base-model", 1), ("comlora", 2)):          # the base model; both ComLoRA components
        record = results / run / "seed-0"
        assert sorted(p.name for p in (record / "eval").iterdir()) == ["first", "short"]
        assert len(list((record / "eval" / "short").glob("commonsense-*.json"))) == files
        [first_file] = (record / "eval" / "first").glob("*.json")              # the winner only
        assert run == "base-model" or "-winner" in first_file.stem
        first = json.loads(first_file.read_text())
        assert len(first["tasks"]["boolq"]["items"]) == 1                       # --limit 1 reached the eval
        assert json.loads((record / "run.json").read_text())["evaluations"]["first"] == [
            "--greedy", "--limit", "1", "--components", "winner"]
    log = (work / "comlora" / "seed-0" / "study.log").read_text()
    assert log.count("$ comlora eval") == 3
    assert run_study(study, work, results, max_runs=1) == [results / "comlora" / "seed-1"]     # nothing redone
    assert (work / "comlora" / "seed-0" / "study.log").read_text() == log
    bad = yaml.safe_load((study / "base.yaml").read_text()) | {"evaluations": {"Bad Name": []}}
    (study / "base.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="evaluations must map names"):
        load_experiments(study)
    from comlora.study.experiments import load_evaluations
    (study / "base.yaml").write_text(yaml.safe_dump(bad | {"evaluations": {"gen": ["--greedy", "--components"]}}))
    with pytest.raises(ValueError, match="evaluation gen: .*--components takes winner or all"):
        load_evaluations(study)

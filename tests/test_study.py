"""The study runner on a tiny model: records every run completely, skips what is recorded, resumes a killed run."""

import json

import pytest
import yaml

from comlora.study.runner import load_experiments, run_study


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
    from comlora.study.runner import train_config
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
    assert json.loads(next((run / "eval").iterdir()).read_text())["settings"]["run"] == "<study-work>/comlora/seed-0/run"


def test_a_bad_experiment_file_fails_before_anything_runs(tmp_path, tiny_model_dir, commonsense_root):
    study = write_study(tmp_path / "study", tiny_model_dir, commonsense_root)
    (study / "broken.yaml").write_text(yaml.safe_dump({"label": "x", "tables": ["t"], "train": {"methd": "lora"}}))
    with pytest.raises(ValueError, match="unknown field"):
        run_study(study, tmp_path / "work", tmp_path / "results")
    assert not (tmp_path / "work").exists()

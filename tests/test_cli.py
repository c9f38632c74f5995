"""The command line end to end on a tiny random Llama and a tiny data root (seconds)."""

import json
import warnings

import pytest
import torch
import yaml
from conftest import train_args
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from comlora.cli import main
from comlora.training.config import TrainConfig
from comlora.training.loop import train


def test_train_select_export_eval(tmp_path, tiny_model_dir, commonsense_root, capsys):
    run = tmp_path / "run"
    main(train_args(tiny_model_dir, commonsense_root, run, "--num-components", "3", "--top-n", "2",
                    "--set", "method_options.selector_heads=4", "--set", "method_options.selector_ffn_dim=32"))
    for name in ["config.yaml", "metrics.jsonl", "winner.json", "loss_curves.png", "lowest_loss_share.png",
                 "state/comlora_model.safetensors", "adapter/adapter_model.safetensors"]:
        assert (run / name).is_file(), name
    assert not (run / "checkpoints").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ["lm", "align", "pairwise", "eta", "component_loss", "lowest_loss_component", "lr", "tokens_per_s",
                "peak_rss_mb"]:
        assert key in rows[0], key
    assert len(rows[0]["component_loss"]) == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["method_options"] == {"selector_heads": 4,
                                                                                 "selector_ffn_dim": 32, "top_n": 2}
    winner = json.loads((run / "winner.json").read_text())
    assert winner["num_samples"] == 6 and len(winner["similarity"]) == 3 and len(winner["val_loss"]) == 3

    main(["select", str(run), "--out", str(tmp_path / "again.json")])
    main(["select", str(run)])                                          # a new file; winner.json untouched
    assert len(list(run.glob("winner-reselected-*.json"))) == 1
    assert json.loads((run / "winner.json").read_text()) == winner
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["winner"] == winner["winner"] and again["similarity"] == pytest.approx(winner["similarity"], rel=1e-5)
    assert again["val_loss"] == pytest.approx(winner["val_loss"], rel=1e-5)

    main(["export", str(run), "--component", "1", "--out", str(tmp_path / "c1")])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, tmp_path / "c1").eval()
    assert not [w for w in caught if "key" in str(w.message).lower()]
    main(["export", str(run), "--component", "1", "--merge", "--out", str(tmp_path / "m1")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m1").eval()
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert (merged(ids).logits - peft_model(input_ids=ids).logits).abs().max() < 1e-4
    with pytest.raises(SystemExit):
        main(["export", str(run), "--out", str(tmp_path / "m1")])          # not empty: refused

    with pytest.raises(SystemExit):                                     # another seed could test on trained items
        main(["eval", "--run", str(run), "--seed", "3", "--data-root", str(commonsense_root), "--limit", "1"])
    capsys.readouterr()
    main(["eval", "--run", str(run), "--components", "all", "--data-root", str(commonsense_root), "--eval-size", "4",
          "--limit", "2", "--greedy", "--max-new-tokens", "4", "--tasks", "boolq,piqa", "--out", str(tmp_path / "ev")])
    table = capsys.readouterr().out
    assert "run-component0" in table and "run-component2" in table
    files = sorted((tmp_path / "ev").glob("commonsense-run-component*.json"))
    assert len(files) == 3 and f"component{winner['winner']}-winner" in files[winner["winner"]].name
    result = json.loads(files[1].read_text())
    assert set(result["tasks"]) == {"boolq", "piqa"} and result["tasks"]["boolq"]["n"] == 2
    main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "c1"),
          "--data-root", str(commonsense_root),
          "--eval-size", "4", "--limit", "1", "--greedy", "--max-new-tokens", "3", "--tasks", "winogrande",
          "--out", str(tmp_path / "ev")])
    assert (tmp_path / "ev" / "commonsense-c1-limit1.json").is_file()
    first = (tmp_path / "ev" / "commonsense-c1-limit1.json").read_text()
    main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "c1"),
          "--data-root", str(commonsense_root),
          "--eval-size", "4", "--limit", "1", "--greedy", "--max-new-tokens", "3", "--tasks", "winogrande",
          "--out", str(tmp_path / "ev")])                                  # the same evaluation again: a new file
    assert (tmp_path / "ev" / "commonsense-c1-limit1.json").read_text() == first
    assert len(list((tmp_path / "ev").glob("commonsense-c1-limit1-*.json"))) == 1


def test_lora_baseline_run_exports_a_peft_adapter(tmp_path, tiny_model_dir, commonsense_root):
    run = tmp_path / "lora"
    main(train_args(tiny_model_dir, commonsense_root, run, "--method", "lora", "--rank", "4"))
    assert json.loads((run / "validation.json").read_text())["num_samples"] == 6
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lm"] < rows[0]["lm"] * 1.5 and len(rows) == 4


def test_resumed_run_ends_with_the_same_weights(tmp_path, tiny_model_dir, commonsense_root):
    values = dict(model=str(tiny_model_dir), data_root=str(commonsense_root), device="cpu", train_per_task=4,
                  val_size=4, eval_size=4, batch_size=4, grad_accum=2, max_steps=5, cutoff_len=256, lr=0.01,
                  lora_dropout=0.1, save_every=2,
                  method_options={"selector_heads": 4, "selector_ffn_dim": 32})
    train(TrainConfig(out=str(tmp_path / "straight"), **values))
    interrupted = TrainConfig(out=str(tmp_path / "resumed"), **values)
    train(interrupted, stop_after=3)                 # as if killed after step 3
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000003"]
    (tmp_path / "resumed" / "checkpoints" / ".tmp-step-00000004").mkdir()   # a write the kill interrupted
    with pytest.raises(FileExistsError, match="not empty"):
        train(interrupted)
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lm": 1.2')                                 # a line the kill cut short
    train(interrupted, resume=True)
    a = load_file(str(tmp_path / "straight" / "state" / "comlora_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "state" / "comlora_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    resumed = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    drop = lambda line: {k: v for k, v in json.loads(line).items()  # noqa: E731
                         if k not in ("tokens_per_s", "step_seconds", "peak_rss_mb")}
    assert [drop(l) for l in straight] == [drop(l) for l in resumed]
    with pytest.raises(ValueError, match="already complete"):
        train(interrupted, resume=True)


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "nope"], "invalid choice: 'nope' (choose from 'comlora', 'lora', 'dora'"),
    (["train", "--set", "bogus=1"], "TrainConfig: unknown field(s) ['bogus']"),
    (["train", "--config", "/nonexistent.yaml"], "does not exist"),
    (["train", "--resume", "--out", "/nonexistent-run"], "config.yaml is missing"),
])
def test_bad_training_input_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_the_rank_flag_is_rank_and_r_still_works():
    from comlora.cli import build_parser, train_config_from_args

    for flag in ("--rank", "--r"):
        assert train_config_from_args(build_parser().parse_args(["train", flag, "16"])).r == 16


def launcher_parsers():
    """(name, parser, its arguments before ``-m comlora``) of torchrun and accelerate launch."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    return [("torchrun", get_args_parser(), ["--nproc-per-node", "2"]),
            ("accelerate launch", launch_command_parser(), ["--num_processes", "2"])]


def test_launchers_pass_every_train_flag_on_to_comlora():
    """torchrun's parser reads an abbreviation of its own options anywhere on the line (``--r`` could be --rdzv-*,
    --role, --run-path, --redirects) and refuses the line; every flag of ``comlora train`` but the old ``--r`` reaches
    comlora untouched through both launchers."""
    from comlora.cli import build_parser

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = [flag for action in train_parser._actions for flag in action.option_strings if flag.startswith("--")]
    assert "--rank" in flags and len(flags) > 40
    for name, parser, launch_args in launcher_parsers():
        for flag in (f for f in flags if f != "--r"):
            args = parser.parse_args([*launch_args, "-m", "comlora", "train", flag, "8"])
            assert (args.training_script, args.training_script_args) == ("comlora", ["train", flag, "8"]), (name, flag)
    with pytest.raises(SystemExit):
        launcher_parsers()[0][1].parse_args(["--nproc-per-node", "2", "-m", "comlora", "train", "--r", "8"])


def test_every_method_trains_evaluates_and_compares(tmp_path, tiny_model_dir, commonsense_root, capsys):
    runs = []
    for method, extra in [("comlora", ["--set", "method_options.selector_heads=4",
                                       "--set", "method_options.selector_ffn_dim=32"]),
                          ("lora", ["--seed", "0"]), ("lora", ["--seed", "1"]), ("dora", []),
                          ("moelora", ["--num-components", "2", "--set", "method_options.top_k=1",
                                       "--set", "method_options.load_balance_weight=0.01"]),
                          ("teamlora", ["--num-components", "2", "--r", "2"]), ("loratrf", [])]:
        run = tmp_path / f"{method}-{len(runs)}"
        main(train_args(tiny_model_dir, commonsense_root, run, "--method", method, "--max-steps", "2", *extra))
        params = json.loads((run / "parameters.json").read_text())
        assert params["adapter"] > 0 and params["mergeable"] == (method in ("comlora", "lora", "dora"))
        assert (run / "adapter").is_dir() == params["mergeable"]
        main(["eval", "--run", str(run), "--data-root", str(commonsense_root), "--eval-size", "4", "--limit", "1",
              "--greedy", "--max-new-tokens", "3", "--tasks", "boolq,piqa"])
        runs.append(run)
    capsys.readouterr()
    main(["compare", *map(str, runs), "--out", str(tmp_path / "table")])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| configuration | runs | params % (L/S) | boolq | piqa | avg | inference |"
    lora_row = next(line for line in table if line.startswith("| method=lora, r=8 |"))
    assert "| 2 |" in lora_row                                      # two seeds grouped
    assert sum("not mergeable" in line for line in table) == 3
    assert (tmp_path / "table.csv").read_text().startswith("configuration,runs,params % (L/S),boolq,piqa,avg,inference")


def test_compare_refuses_an_unevaluated_run(tmp_path, tiny_model_dir, commonsense_root, capsys):
    run = tmp_path / "lora"
    main(train_args(tiny_model_dir, commonsense_root, run, "--method", "lora", "--max-steps", "1"))
    with pytest.raises(SystemExit):
        main(["compare", str(run)])
    assert "comlora eval --run" in capsys.readouterr().err


def test_mmlu_and_convai2_train_and_evaluate(tmp_path, tiny_model_dir, capsys):
    """Training on MMLU-format and ConvAI2 data, and both evaluations, through the same commands (real data root)."""
    from comlora.data.items import data_root

    root = str(data_root())
    common = ["--model", str(tiny_model_dir), "--data-root", root, "--device", "cpu", "--batch-size", "4",
              "--max-steps", "2", "--cutoff-len", "1024", "--method", "lora"]
    main(["train", *common, "--data", "mmlu", "--val-size", "8", "--out", str(tmp_path / "mmlu")])
    main(["train", *common, "--data", "convai2", "--history-turns", "0", "--val-size", "8",
          "--out", str(tmp_path / "convai2")])
    assert json.loads((tmp_path / "convai2" / "validation.json").read_text())["num_samples"] == 8
    capsys.readouterr()
    main(["eval", "--run", str(tmp_path / "mmlu"), "--task", "mmlu", "--data-root", root, "--subjects",
          "anatomy,virology", "--limit", "2", "--shots", "1"])
    out = capsys.readouterr().out
    assert "micro avg" in out
    result = json.loads((tmp_path / "mmlu" / "eval" / "mmlu-mmlu-limit2.json").read_text())
    assert result["n"] == 4 and {r["subject"] for r in result["items"]} == {"anatomy", "virology"}
    main(["eval", "--run", str(tmp_path / "convai2"), "--task", "convai2", "--data-root", root, "--limit", "3",
          "--greedy", "--max-new-tokens", "4", "--no-bertscore"])
    result = json.loads((tmp_path / "convai2" / "eval" / "convai2-convai2-limit3.json").read_text())
    assert result["n"] == 3 and result["metrics"]["bleu"] is not None and result["metrics"]["bertscore_f1"] is None


def test_demo_pipeline_on_a_tiny_model(tmp_path, tiny_model_dir, commonsense_root, capsys):
    from comlora.demo import run_demo

    shared = dict(model=str(tiny_model_dir), data_root=str(commonsense_root), device="cpu", train_per_task=1,
                  val_size=4, eval_size=2, batch_size=4, max_steps=1, cutoff_len=256, window=1)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "demo-comlora.yaml").write_text(yaml.safe_dump(
        dict(shared, method="comlora", method_options={"selector_heads": 4, "selector_ffn_dim": 32})))
    (tmp_path / "cfg" / "demo-lora.yaml").write_text(yaml.safe_dump(dict(shared, method="lora")))
    summary = run_demo(tmp_path / "demo", limit=1, config_dir=tmp_path / "cfg")
    assert len(summary["average_accuracy"]) == 3 and summary["configs"]["lora"]["method"] == "lora"
    for name in ["results.json", "results.md", "loss_curves_vs_lora.png", "comlora/winner.json", "lora/adapter"]:
        assert (tmp_path / "demo" / name).exists(), name
    assert "wall time" in capsys.readouterr().out
    run_demo(tmp_path / "demo", limit=1, config_dir=tmp_path / "cfg")          # never overwrites the first demo
    assert len(list(tmp_path.glob("demo-*"))) == 1


@pytest.mark.parametrize("flag, calls", [([], 1), (["--no-retain-cpu-memory"], 0)])
def test_cpu_training_and_evaluation_keep_freed_memory_unless_told_not_to(tmp_path, tiny_model_dir, commonsense_root,
                                                                          monkeypatch, flag, calls):
    called = []
    record = lambda: called.append(True) or True  # noqa: E731
    monkeypatch.setattr("comlora.training.loop.retain_freed_memory", record)
    monkeypatch.setattr("comlora.cpu_memory.retain_freed_memory", record)
    main(train_args(tiny_model_dir, commonsense_root, tmp_path / "run", "--method", "lora", "--max-steps", "1", *flag))
    assert len(called) == calls
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["retain_cpu_memory"] is (calls == 1)
    main(["eval", "--run", str(tmp_path / "run"), "--data-root", str(commonsense_root), "--limit", "1",
          "--device", "cpu", *flag])
    assert len(called) == 2 * calls

"""The first minute of every command (issue 25): ``--help`` and ``import comlora`` load none of torch, transformers,
peft, accelerate or bitsandbytes; a command on a full-precision base never imports bitsandbytes (whose import takes
seconds and can log a kernel warning) and shows one line per model load instead of transformers' progress bars; a
missing file or folder fails before a model is loaded, and a Hub the machine cannot reach fails within seconds."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_args

from comlora.cli import main
from comlora.training.config import TrainConfig
from comlora.training.loop import train

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = {"torch", "transformers", "peft", "accelerate", "bitsandbytes", "kernels"}
UNREACHABLE_HUB = "http://127.0.0.1:9"          # the discard port: nothing listens, the connection is refused at once


def run_python(args, cwd, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment.update(PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)


def imported_packages(importtime_log: str) -> set[str]:
    """The top-level packages ``python -X importtime`` reports as imported."""
    return {line.rpartition("|")[2].strip().split(".")[0] for line in importtime_log.splitlines()
            if line.startswith("import time:")}


@pytest.mark.parametrize("args", [["-m", "comlora", "--help"], ["-m", "comlora", "train", "--help"],
                                  ["-m", "comlora", "eval", "--help"], ["-c", "import comlora; comlora.ComLoraConfig"]])
def test_help_and_import_load_no_heavy_package(args, tmp_path):
    done = run_python(["-X", "importtime", *args], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not imported_packages(done.stderr) & HEAVY
    messages = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert not messages, messages                # no third-party line (bitsandbytes' kernel warning, ...)
    if "--help" in args:
        assert done.stdout.startswith("usage: comlora")


def test_commands_on_a_full_precision_base_import_no_bitsandbytes_and_draw_no_loading_bars(tmp_path, tiny_model_dir,
                                                                                            commonsense_root):
    commands = [train_args(tiny_model_dir, commonsense_root, tmp_path / "comlora", max_steps=2),
                train_args(tiny_model_dir, commonsense_root, tmp_path / "lora", "--method", "lora", max_steps=2),
                ["export", str(tmp_path / "comlora"), "--merge", "--out", str(tmp_path / "merged")],
                ["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "lora" / "adapter"),
                 "--data-root", str(commonsense_root), "--eval-size", "4", "--limit", "1", "--greedy",
                 "--max-new-tokens", "2", "--tasks", "boolq", "--out", str(tmp_path / "eval")]]
    script = ("import json, sys\nfrom comlora.cli import main\n"
              f"for argv in {json.dumps(commands)}:\n    main(argv)\n"
              "print('IMPORTED', json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
    done = run_python(["-c", script], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = set(json.loads(done.stdout.split("IMPORTED", 1)[1]))
    assert "peft" in imported and "bitsandbytes" not in imported
    assert "Loading weights" not in done.stderr and "Writing model shards" not in done.stderr
    assert "Warning" not in done.stderr, done.stderr     # e.g. transformers' FutureWarning on what PeftModel reads
    assert done.stderr.count("loading model ") == len(commands)
    assert f"loading model {tiny_model_dir} on cpu, float32" in done.stderr.splitlines()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_a_quantized_base_still_finds_bitsandbytes_after_peft_was_used_without_it(tmp_path, tiny_model_dir):
    """peft's cached "is bitsandbytes installed?" answers, given while it was hidden, are cleared: PEFT then puts its
    own 4-bit LoRA layers on a 4-bit base loaded later in the same process."""
    script = f"""
import sys
from comlora.base_models import load_model_and_tokenizer
from comlora.methods.lora import PeftLoraConfig, PeftLoraModel
PeftLoraModel(load_model_and_tokenizer({str(tiny_model_dir)!r}, device="cpu")[0], PeftLoraConfig(r=2))
assert "bitsandbytes" not in sys.modules
base = load_model_and_tokenizer({str(tiny_model_dir)!r}, device="cpu", dtype="float32", load_in_4bit=True)[0]
from peft.tuners.lora.bnb import Linear4bit
lora = PeftLoraModel(base, PeftLoraConfig(r=2))
print("LORA_4BIT_LAYERS", sum(isinstance(m, Linear4bit) for m in lora.modules()))
"""
    done = run_python(["-c", script], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split("LORA_4BIT_LAYERS", 1)[1]) == 10      # q, k, v, up, down in each of 2 layers


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any model load fails the test: what is checked must fail before one."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad path was noticed")

    modules = [importlib.import_module(name) for name in ("comlora.base_models", "comlora.training.loop",
                                                          "comlora.training.finished_run")]
    for module in modules:          # imported first: one imported while another is patched would keep the patch
        monkeypatch.setattr(module, "load_model_and_tokenizer", load)


def test_missing_data_and_paths_fail_before_a_model_loads(tmp_path, tiny_model_dir, commonsense_root, capsys,
                                                          no_model_loading):
    run = tmp_path / "run"
    run.mkdir()                                 # a run directory, as far as select reads one before loading
    (run / "config.yaml").write_text(f"model: {tiny_model_dir}\ndata_root: {commonsense_root}\n")
    cases = [(train_args(tiny_model_dir, commonsense_root, tmp_path / "new", "--data", "/nonexistent.json"),
              "/nonexistent.json: no such data file or folder"),
             (train_args("/nonexistent/model", commonsense_root, tmp_path / "new"),
              "cannot load model '/nonexistent/model': no such folder"),
             (["select", str(run), "--data", "/nonexistent.json"], "/nonexistent.json: no such data file or folder"),
             (["eval", "--model", str(tiny_model_dir), "--adapter", "/nonexistent-adapter", "--data-root",
               str(commonsense_root), "--eval-size", "4", "--limit", "1"],
              "--adapter /nonexistent-adapter: no such folder")]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    with pytest.raises(FileNotFoundError, match="/nonexistent.json: no such data file or folder"):     # the library too
        train(TrainConfig(model=str(tiny_model_dir), data="/nonexistent.json", out=str(tmp_path / "new"), device="cpu"))


def fake_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> None:
    """``model_dir`` as the Hugging Face cache holds a downloaded ``repo_id`` (huggingface_hub's layout)."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


HUB_CASES = """
import json, sys, time
import comlora.training.loop
from comlora.base_models import load_model_and_tokenizer
from comlora.cli import main
load_model_and_tokenizer(sys.argv[1], device="cpu")      # the first load imports the model's code: not timed
for name in sys.argv[2:]:
    start, error = time.time(), None
    try:
        load_model_and_tokenizer(name, device="cpu")
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    print("CASE", json.dumps({"name": name, "seconds": time.time() - start, "error": error}), flush=True)
start = time.time()
try:
    main(["train", "--model", "nonexistent-org/nonexistent-model", "--out", "run", "--data", "items.json"])
except SystemExit as exit:
    print("CLI", json.dumps({"seconds": time.time() - start, "code": exit.code}), flush=True)
"""


def test_an_unreachable_hub_fails_within_seconds_naming_hf_hub_offline_and_a_cached_model_loads(tmp_path,
                                                                                               tiny_model_dir):
    """Before, transformers retried the Hub for 54 s (22 lines) before its error, and did so for a cached model too."""
    fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_model_dir)
    (tmp_path / "items.json").write_text(json.dumps([{"instruction": f"q{i}", "input": "", "output": "a"}
                                                     for i in range(200)]))
    cases = [str(tiny_model_dir), "nonexistent-org/nonexistent-model", "tiny-org/tiny-llama", "/nonexistent/model"]
    done = run_python(["-c", HUB_CASES, *cases], tmp_path, HF_ENDPOINT=UNREACHABLE_HUB,
                      HF_HUB_CACHE=str(tmp_path / "hub"))
    assert done.returncode == 0, done.stderr[-3000:]
    missing, cached, no_folder = [json.loads(line.removeprefix("CASE ")) for line in done.stdout.splitlines()
                                  if line.startswith("CASE ")]
    assert no_folder["error"] == ("FileNotFoundError: cannot load model '/nonexistent/model': no such folder (and not "
                                  "a Hub id such as org/name)")
    assert missing["seconds"] < 10 and "the Hugging Face Hub cannot be reached" in missing["error"]
    assert "HF_HUB_OFFLINE" in missing["error"]
    assert cached["error"] is None and cached["seconds"] < 10
    assert "tiny-org/tiny-llama is read from the local cache" in done.stderr
    cli = json.loads(done.stdout.split("CLI ", 1)[1])
    assert cli["code"] == 2 and cli["seconds"] < 10
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "HF_HUB_OFFLINE" in errors[0] and "Retry" not in done.stderr

    offline = run_python(["-c", HUB_CASES, str(tiny_model_dir), "nonexistent-org/nonexistent-model"], tmp_path,
                         HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    case = json.loads(offline.stdout.split("CASE ", 1)[1].splitlines()[0])
    assert "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" in case["error"]

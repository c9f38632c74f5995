"""Slow tests of the scale features (`make test-slow`): FSDP over gloo with two processes, and SmolLM2 on a
4-bit base with gradient checkpointing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
FSDP_CONFIG = Path(__file__).parent.parent / "examples" / "accelerate" / "fsdp.yaml"


def test_fsdp_over_two_cpu_processes_equals_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir,
                                                                                    commonsense_root):
    common = ["train", "--model", str(tiny_model_dir), "--data-root", str(commonsense_root), "--device", "cpu",
              "--train-per-task", "4", "--val-size", "4", "--eval-size", "4", "--max-steps", "3", "--lr", "0.01",
              "--noise-alpha", "0", "--lora-dropout", "0", "--set", "method_options.selector_dropout=0",
              "--set", "method_options.selector_heads=4", "--set", "method_options.selector_ffn_dim=32",
              "--max-grad-norm", "0.05"]          # below both groups' norms: per-group clipping acts on every step
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([str(BIN / "comlora"), *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
                   check=True, env=env)
    # the shipped FSDP config, on CPU processes (gloo) and in float32
    config = yaml.safe_load(FSDP_CONFIG.read_text()) | {"use_cpu": True, "mixed_precision": "no", "num_processes": 2}
    (tmp_path / "fsdp-cpu.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([str(BIN / "accelerate"), "launch", "--config_file", str(tmp_path / "fsdp-cpu.yaml"),
                             "-m", "comlora", *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]
    a = load_file(str(tmp_path / "one" / "state" / "comlora_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "state" / "comlora_model.safetensors"))
    assert a.keys() == b.keys() and any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    one = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for key in ("lm", "grad_norm", "grad_norm_adapter", "grad_norm_router"):   # the sharded groups' norms are whole
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], rel=1e-4), key
    assert all(r["grad_norm_adapter"] > 0.05 and r["grad_norm_router"] > 0.05 for r in one[1:])
    assert json.loads((tmp_path / "two" / "winner.json").read_text())["winner"] == \
        json.loads((tmp_path / "one" / "winner.json").read_text())["winner"]


def test_smollm2_trains_on_a_4bit_base_with_gradient_checkpointing(tmp_path):
    run = tmp_path / "run"
    subprocess.run([str(BIN / "comlora"), "train", "--out", str(run), "--max-steps", "2", "--batch-size", "2",
                    "--train-per-task", "1", "--val-size", "4", "--device", "cpu", "--cutoff-len", "128",
                    "--load-in-4bit", "--gradient-checkpointing"], check=True)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["lm"] > 0 for r in rows)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    subprocess.run([str(BIN / "comlora"), "export", str(run), "--merge", "--out", str(tmp_path / "merged")], check=True)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())

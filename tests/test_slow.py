"""Slow tests (`make test-slow`): two-process data parallel training, and the CLI on the real SmolLM2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, commonsense_root):
    common = ["train", "--model", str(tiny_model_dir), "--data-root", str(commonsense_root), "--device", "cpu",
              "--train-per-task", "4", "--val-size", "4", "--eval-size", "4", "--max-steps", "3", "--lr", "0.01",
              "--noise-alpha", "0", "--lora-dropout", "0", "--set", "method_options.selector_dropout=0",
              "--set", "method_options.selector_heads=4", "--set", "method_options.selector_ffn_dim=32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([str(BIN / "comlora"), *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
                   check=True, env=env)
    # accelerate 1.15's `accelerate launch --cpu --num_processes 2` starts ONE process (CPU multi-process
    # needs mpirun there); torchrun starts two and Accelerate picks them up (MULTI_CPU, gloo).
    subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "comlora", *common,
                    "--batch-size", "2", "--save-every", "1", "--out", str(tmp_path / "two")], check=True, env=env)
    a = load_file(str(tmp_path / "one" / "state" / "comlora_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "state" / "comlora_model.safetensors"))
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    one = [json.loads(l)["lm"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(l)["lm"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert one == pytest.approx(two, rel=1e-4)


def test_cli_end_to_end_on_smollm2(tmp_path):
    run = tmp_path / "run"
    subprocess.run([str(BIN / "comlora"), "train", "--out", str(run), "--max-steps", "2", "--batch-size", "2",
                    "--train-per-task", "1", "--val-size", "4", "--device", "cpu", "--cutoff-len", "128",
                    "--save-every", "1"], check=True)
    assert 0 < json.loads((run / "winner.json").read_text())["num_samples"] <= 4   # long items are left out
    subprocess.run([str(BIN / "comlora"), "select", str(run)], check=True)
    subprocess.run([str(BIN / "comlora"), "export", str(run), "--out", str(tmp_path / "adapter")], check=True)
    subprocess.run([str(BIN / "comlora"), "eval", "--run", str(run), "--limit", "1", "--greedy",
                    "--tasks", "boolq,piqa", "--max-new-tokens", "8", "--out", str(tmp_path / "ev")], check=True)
    result = json.loads(next((tmp_path / "ev").glob("commonsense-*.json")).read_text())
    assert result["tasks"]["boolq"]["n"] == 1

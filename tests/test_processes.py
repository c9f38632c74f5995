"""Work done by the main process alone: every process learns of its failure; each process resumes its own RNG."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from comlora.training.processes import on_main_process
from comlora.training.run_checkpoints import load_checkpoint, rng_state, save_checkpoint

BIN = Path(sys.executable).parent
ONE_PROCESS = SimpleNamespace(is_main_process=True, num_processes=1)


def test_one_process_returns_the_result_and_raises_the_error():
    assert on_main_process(ONE_PROCESS, lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(FileExistsError, match="not empty"):
        on_main_process(ONE_PROCESS, lambda: (_ for _ in ()).throw(FileExistsError("run directory x is not empty")))


def test_a_failure_on_the_main_process_stops_every_process(tmp_path, tiny_model_dir, commonsense_root):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("the user's file")
    argv = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "comlora", "train", "--model", str(tiny_model_dir),
            "--data-root", str(commonsense_root), "--device", "cpu", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode != 0
    assert "error: run directory" in done.stderr and "is not empty" in done.stderr       # the main process
    assert "error: the main process failed: FileExistsError: run directory" in done.stderr  # the other one
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_torchrun_without_device_trains_one_run_over_both_processes(tmp_path, tiny_model_dir, commonsense_root):
    """--device auto on a CPU: both processes join one gloo group (they used to run alone, racing into one --out)."""
    from comlora.training.config import TrainConfig
    from comlora.training.data import training_items

    out = tmp_path / "run"
    options = dict(model=str(tiny_model_dir), data_root=str(commonsense_root), train_per_task=2, val_size=4,
                   eval_size=4, batch_size=2, epochs=1)
    argv = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "comlora", "train", "--out", str(out),
            *(f"--{k.replace('_', '-')}={v}" for k, v in options.items())]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert (out / "complete.json").is_file()
    items = len(training_items(TrainConfig(**options))[0])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, items // (2 * 2) + 1))      # an epoch in steps of 2 items x 2 processes


def test_each_process_resumes_its_own_random_state(tmp_path):
    method = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(method.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    states = []
    for seed in (1, 2):                       # two processes whose generators have diverged
        torch.manual_seed(seed)
        states.append(rng_state())
    path = save_checkpoint(tmp_path, method, optimizer, scheduler, 7, keep=1, rng_states=states)
    for process, seed in ((0, 1), (1, 2), (2, 1)):  # a process the checkpoint does not know takes process 0's
        torch.manual_seed(99)
        assert load_checkpoint(path, method, optimizer, scheduler, process) == 7
        drawn = torch.rand(4)
        torch.manual_seed(seed)
        assert torch.equal(drawn, torch.rand(4))

"""Resume of a sharded run: FSDP2 over two CPU processes (gloo), started with the shipped
examples/accelerate/fsdp.yaml as the README says (no --device, no --mixed-precision: the config's bf16 stands),
stopped after a checkpoint and resumed in new processes, ends where the uninterrupted run ends."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

BIN = Path(sys.executable).parent
FSDP_CONFIG = Path(__file__).parent.parent / "examples" / "accelerate" / "fsdp.yaml"
# one launch runs the uninterrupted run, then the same run stopped after step 2 (its checkpoint written), as a kill
# after that checkpoint would leave it
TWO_RUNS = """
import json, sys
from comlora.training.config import TrainConfig
from comlora.training.loop import train

options = json.loads(sys.argv[1])
train(TrainConfig(**options, out=sys.argv[2]))
train(TrainConfig(**options, out=sys.argv[3]), stop_after=2)
"""


def launch(*argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "accelerate"), "launch", "--config_file", str(FSDP_CONFIG), *argv],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-6000:]
    return done


def test_a_stopped_fsdp_run_resumes_from_its_sharded_checkpoint_to_the_uninterrupted_state(tmp_path, tiny_model_dir,
                                                                                         commonsense_root):
    options = dict(model=str(tiny_model_dir), data_root=str(commonsense_root), train_per_task=2, val_size=4,
                   eval_size=4, batch_size=2, max_steps=4, save_every=2, lr=0.01, lora_dropout=0.1,
                   method_options={"selector_heads": 4, "selector_ffn_dim": 32})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    (tmp_path / "two_runs.py").write_text(TWO_RUNS)
    launch(str(tmp_path / "two_runs.py"), json.dumps(options), str(whole), str(cut))
    assert not (cut / "complete.json").exists() and (whole / "complete.json").is_file()
    saved = json.loads((cut / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert saved["step"] == 2 and saved["sharded"] == "FSDP" and saved["num_processes"] == 2
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step-00000002"]     # no temp folder left

    resumed = launch("-m", "comlora", "train", "--resume", "--config", str(cut / "config.yaml"), "--out", str(cut))
    assert "starts again from step 0" not in resumed.stderr
    for run in (whole, cut):
        assert (run / "complete.json").is_file() and not (run / "checkpoints").exists()
        assert json.loads((run / "parameters.json").read_text())
        assert (run / "config.yaml").read_text().count("mixed_precision: bf16") == 1    # the launcher's
    a = load_file(str(whole / "state" / "comlora_model.safetensors"))
    b = load_file(str(cut / "state" / "comlora_model.safetensors"))
    assert a.keys() == b.keys() and any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B"))
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5, k
    rows = {run: [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] for run in (whole, cut)}
    assert [r["step"] for r in rows[cut]] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows[cut]] == pytest.approx([r["loss"] for r in rows[whole]], abs=1e-5)
    assert json.loads((cut / "winner.json").read_text())["winner"] == \
        json.loads((whole / "winner.json").read_text())["winner"]


def test_each_kind_of_run_resumes_only_from_its_own_kind_of_checkpoint(tmp_path):
    from types import SimpleNamespace

    import torch
    from torch import nn

    from comlora.training.run_checkpoints import resume_from_checkpoint, resume_from_sharded_checkpoint, save_checkpoint
    from comlora.training.safe_run_dir import RunError

    sharded = tmp_path / "sharded" / "checkpoints" / "step-00000002"
    sharded.mkdir(parents=True)
    (sharded / "trainer_state.json").write_text(json.dumps({"step": 2, "sharded": "FSDP", "num_processes": 2}))
    method = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(method.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(RunError, match=r"step-00000002 was written by a sharded \(FSDP\) run: resume it as it was "
                                       r"trained, with accelerate launch"):
        resume_from_checkpoint(tmp_path / "sharded", method, optimizer, scheduler)

    save_checkpoint(tmp_path / "plain", method, optimizer, scheduler, 3, keep=1, rng_states=[{}])
    one_process = SimpleNamespace(is_main_process=True, num_processes=1)
    with pytest.raises(RunError, match="step-00000003 was not written by a sharded run .* without FSDP / DeepSpeed"):
        resume_from_sharded_checkpoint(one_process, tmp_path / "plain", method)

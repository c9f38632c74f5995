"""The CLI's training loop at scale: gradient checkpointing, experiment trackers, mixed-precision refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

from comlora.cli import main
from comlora.training.config import TrainConfig
from comlora.training.loop import train


def run_config(tmp_path, tiny_model_dir, commonsense_root, name, **extra):
    values = dict(model=str(tiny_model_dir), data_root=str(commonsense_root), device="cpu", train_per_task=2,
                  val_size=4, eval_size=4, batch_size=4, max_steps=3, lr=0.01, lora_dropout=0.1,
                  method_options={"selector_heads": 4, "selector_ffn_dim": 32})
    return TrainConfig(out=str(tmp_path / name), **{**values, **extra})


def test_checkpointed_run_with_tensorboard_equals_the_plain_run(tmp_path, tiny_model_dir, commonsense_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain = train(run_config(tmp_path, tiny_model_dir, commonsense_root, "plain"))
    tracked = train(run_config(tmp_path, tiny_model_dir, commonsense_root, "tracked", gradient_checkpointing=True,
                               report_to=["tensorboard"]))
    a = load_file(str(plain / "state" / "comlora_model.safetensors"))
    b = load_file(str(tracked / "state" / "comlora_model.safetensors"))
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k

    rows = [json.loads(line) for line in (tracked / "metrics.jsonl").read_text().splitlines()]
    plain_rows = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert [r["lm"] for r in rows] == pytest.approx([r["lm"] for r in plain_rows], abs=1e-5)
    events = list((tracked / "trackers" / "comlora").glob("events.out.tfevents.*"))  # (hparams go to a subfolder)
    assert len(events) == 1
    scalars = EventAccumulator(str(events[0])).Reload()
    tags = set(scalars.Tags()["scalars"])
    for tag in ["lm", "align", "pairwise", "eta", "loss", "lowest_loss_component", "component_loss/0",
                "component_loss/1", "lr"]:
        assert tag in tags, tag
        logged = scalars.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3]
        key, _, index = tag.partition("/")
        expected = [r[key][int(index)] if index else r[key] for r in rows]
        assert [e.value for e in logged] == pytest.approx(expected, rel=1e-6), tag


@pytest.mark.parametrize("argv, message", [
    (["--mixed-precision", "fp16"], "fp16 needs a CUDA GPU"),
    (["--dtype", "float16"], "float16 training needs loss scaling"),
    (["--report-to", "tensorbored"], "unknown tracker(s) ['tensorbored']"),
    (["--load-in-4bit", "--load-in-8bit"], "choose one of load_in_4bit and load_in_8bit"),
])
def test_unsupported_precision_and_tracker_choices_are_clear_errors(argv, message, tmp_path, tiny_model_dir,
                                                                    commonsense_root, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model", str(tiny_model_dir), "--data-root", str(commonsense_root), "--device", "cpu",
              "--out", str(tmp_path / "run"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("given, launcher, resolved", [
    (None, None, "no"),            # neither: no mixed precision
    (None, "bf16", "bf16"),        # accelerate launch with mixed_precision: bf16 (examples/accelerate/*.yaml)
    ("bf16", "bf16", "bf16"),
    ("bf16", None, "bf16"),        # torchrun: no launcher setting
    ("bf16", "no", "bf16"),        # the launcher's `no` is also its default: the given value stands
])
def test_mixed_precision_is_the_launchers_unless_given(given, launcher, resolved):
    from comlora.training.distributed import with_launcher_mixed_precision

    environ = {} if launcher is None else {"ACCELERATE_MIXED_PRECISION": launcher}
    cfg = with_launcher_mixed_precision(TrainConfig(mixed_precision=given), environ)
    assert cfg.mixed_precision == resolved


def test_mixed_precision_contradicting_the_launcher_is_refused(tmp_path, tiny_model_dir, commonsense_root, capsys,
                                                               monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(SystemExit):
        main(["train", "--model", str(tiny_model_dir), "--data-root", str(commonsense_root), "--device", "cpu",
              "--out", str(tmp_path / "run"), "--mixed-precision", "no"])
    assert ("error: --mixed-precision no contradicts the launcher's mixed precision bf16 (accelerate launch's "
            "mixed_precision, in ACCELERATE_MIXED_PRECISION)") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match="the launcher's mixed precision fp8 .* is not supported by comlora train"):
        train(run_config(tmp_path, tiny_model_dir, commonsense_root, "fp8"))
    assert not (tmp_path / "fp8").exists()

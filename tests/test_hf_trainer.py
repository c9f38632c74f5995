"""ComLoraTrainer: ComLoRA inside transformers.Trainer on a tiny Llama (seconds)."""

import json

import pytest
import torch
from conftest import VOCAB, make_tiny_llama, randomise_lora_B
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from comlora import ComLoraConfig, ComLoraModel, ComLoraTrainer
from comlora.data.items import collate

CONFIG = dict(num_components=2, r=4, lora_alpha=8, top_n=2, selector_heads=4, selector_ffn_dim=32,
              selector_dropout=0.0, noise_alpha=0.1, lora_dropout=0.1, seed=3)


def examples(n: int, seed: int):
    """Tokenised items of different lengths (prompt masked in the labels) and a text column no model takes."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + i % 5
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * 3 + ids[3:],
                     "text": f"item {i}"})
    return Dataset.from_list(rows)


def arguments(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                  max_steps=4, learning_rate=0.02, logging_steps=1, report_to="none", save_strategy="no",
                  use_cpu=True, seed=11, disable_tqdm=True)
    return TrainingArguments(**{**values, **overrides})


def comlora_model():
    return ComLoraModel(make_tiny_llama(seed=0), ComLoraConfig(**CONFIG))


def state(cm):
    return {k: v.detach().clone() for k, v in cm.state_tensors().items()}


def test_trainer_trains_logs_evaluates_and_saves_the_winner(tmp_path):
    cm = comlora_model()
    train_set, val_set = examples(16, seed=1), examples(6, seed=2)
    trainer = ComLoraTrainer(model=cm, args=arguments(tmp_path, report_to=["tensorboard"]),
                             train_dataset=train_set, eval_dataset=val_set)
    batch = next(iter(trainer.get_train_dataloader()))      # default arguments: remove_unused_columns=True
    assert set(batch) == {"input_ids", "attention_mask", "labels"}            # the text column went, nothing else
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "lm" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    for key in ["loss", "lm", "align", "pairwise", "eta", "component_loss_0", "component_loss_1",
                "lowest_loss_component"]:
        assert key in logs[0], key
    assert logs[0]["eta"] == 0.0 and 0 < logs[-1]["eta"] < 1        # eta(t) from the trainer state: step / max_steps
    assert all(layer.lora_B.abs().sum() > 0 for layer in cm.adapted.values())   # the components trained
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()                                   # what report_to="tensorboard" wrote under output_dir/runs
    for event_file in (tmp_path / "out").rglob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(event_file)).Reload().Tags()["scalars"])
    assert {"train/lm", "train/align", "train/pairwise", "train/eta", "train/lowest_loss_component"} <= tags

    # evaluation = winner selection: the same numbers as select_winner on batches made another way
    metrics = trainer.evaluate()
    reference = cm.select_winner([collate([dict(e) for e in val_set.select(range(s, min(s + 4, 6)))], 0)
                                  for s in range(0, 6, 4)])
    assert metrics["eval_winner"] == reference.winner
    assert metrics["eval_loss"] == pytest.approx(reference.val_loss[reference.winner], rel=1e-5)
    for k in range(2):
        assert metrics[f"eval_loss_component_{k}"] == pytest.approx(reference.val_loss[k], rel=1e-5)
        assert metrics[f"eval_similarity_{k}"] == pytest.approx(reference.similarity[k], rel=1e-5)

    out = tmp_path / "winner"
    trainer.save_model(str(out))
    winner = json.loads((out / "winner.json").read_text())
    assert winner["winner"] == reference.winner and winner["num_samples"] == 6
    ids = torch.randint(3, VOCAB, (2, 9))
    cm.eval()
    with torch.no_grad(), cm.use_component(winner["winner"]):
        ours = cm(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(make_tiny_llama(seed=0), out).eval()
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - ours).abs().max() < 1e-5


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_checkpoints_hold_the_trainable_state_and_resume_exactly(tmp_path):
    train_set, val_set = examples(24, seed=1), examples(4, seed=2)
    straight = comlora_model()
    ComLoraTrainer(model=straight, args=arguments(tmp_path / "a"), train_dataset=train_set,
                   eval_dataset=val_set).train()

    interrupted = comlora_model()
    args = arguments(tmp_path / "b", save_strategy="steps", save_steps=2)
    ComLoraTrainer(model=interrupted, args=args, train_dataset=train_set, eval_dataset=val_set,
                   callbacks=[StopAt(2)]).train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    weights = load_file(str(checkpoint / "comlora_model.safetensors"))
    assert set(weights) == set(interrupted.state_tensors())                # trainable state only, no base weight
    assert not list(checkpoint.glob("model*.safetensors"))

    resumed = comlora_model()
    ComLoraTrainer(model=resumed, args=args, train_dataset=train_set,
                   eval_dataset=val_set).train(resume_from_checkpoint=str(checkpoint))
    a, b = state(straight), state(resumed)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("lora_B"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_training_arguments_gradient_checkpointing_gives_the_same_training(tmp_path):
    train_set, val_set = examples(8, seed=1), examples(4, seed=2)
    plain, checkpointed = comlora_model(), comlora_model()
    ComLoraTrainer(model=plain, args=arguments(tmp_path / "p", max_steps=2), train_dataset=train_set,
                   eval_dataset=val_set).train()
    ComLoraTrainer(model=checkpointed, args=arguments(tmp_path / "c", max_steps=2, gradient_checkpointing=True),
                   train_dataset=train_set, eval_dataset=val_set).train()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    a, b = state(plain), state(checkpointed)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


def test_training_arguments_bf16_runs_the_forward_in_bfloat16(tmp_path):
    train_set, val_set = examples(8, seed=1), examples(4, seed=2)
    runs = {}
    for name, options in (("fp32", {}), ("bf16", {"bf16": True})):
        cm = comlora_model()
        dtypes = set()
        cm.model.model.layers[0].mlp.down_proj.register_forward_hook(
            lambda m, i, out, dtypes=dtypes: dtypes.add(out.dtype))
        trainer = ComLoraTrainer(model=cm, args=arguments(tmp_path / name, max_steps=2, **options),
                                 train_dataset=train_set, eval_dataset=val_set)
        trainer.train()
        runs[name] = ([e["lm"] for e in trainer.state.log_history if "lm" in e], dtypes)
    assert runs["fp32"][1] == {torch.float32} and runs["bf16"][1] == {torch.bfloat16}
    # bf16 autocast rounds the activations: the same losses to bf16 precision
    assert runs["bf16"][0] == pytest.approx(runs["fp32"][0], rel=2e-2)


def test_a_model_that_is_not_comlora_or_a_batch_without_labels_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="trains a ComLoraModel"):
        ComLoraTrainer(model=make_tiny_llama(), args=arguments(tmp_path), eval_dataset=examples(4, seed=2))
    unlabeled = Dataset.from_list([{"text": "a"}])
    trainer = ComLoraTrainer(model=comlora_model(), args=arguments(tmp_path, remove_unused_columns=False),
                             train_dataset=unlabeled, eval_dataset=unlabeled)
    with pytest.raises(ValueError, match="has no input_ids"):
        trainer.train()


def test_a_trainer_without_an_eval_dataset_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"ComLoraTrainer needs an eval_dataset: ComLoRA selects its winner on it "
                                         r"\(evaluate\(\), save_model\(\)\); hold out part of your data"):
        ComLoraTrainer(model=comlora_model(), args=arguments(tmp_path), train_dataset=examples(8, seed=1))
    assert not (tmp_path / "out").exists()


def one_trainer_step(tmp_path, pairwise_weight: float, clip_grad: str):
    """One optimizer step of ComLoraTrainer at max_grad_norm 1e-3 (clipping active): (the step's log, the state)."""
    cm = ComLoraModel(make_tiny_llama(seed=0), ComLoraConfig(**{**CONFIG, "noise_alpha": 0.0, "lora_dropout": 0.0,
                                                                     "pairwise_weight": pairwise_weight}))
    randomise_lora_B(cm.adapted.values())
    trainer = ComLoraTrainer(model=cm, args=arguments(tmp_path / f"{clip_grad}-{pairwise_weight}", max_steps=1,
                                                      max_grad_norm=1e-3), train_dataset=examples(4, seed=1),
                             eval_dataset=examples(4, seed=2), clip_grad=clip_grad)
    trainer.train()
    return next(e for e in trainer.state.log_history if "lm" in e), state(cm)


def test_trainer_clips_per_group_by_default_and_joint_on_request(tmp_path):
    """Per group (the default), a pairwise weight 100 times larger leaves the components' step bit-identical;
    joint (the Trainer's own way) shrinks it. Each group's norm before clipping is logged beside grad_norm."""
    steps = {(w, mode): one_trainer_step(tmp_path, w, mode) for w in (1.0, 100.0) for mode in ("per_group", "joint")}
    log, _ = steps[(1.0, "per_group")]
    assert log["grad_norm_adapter"] > 1e-3 and log["grad_norm_router"] > 1e-3
    assert log["grad_norm"] == pytest.approx((log["grad_norm_adapter"] ** 2 + log["grad_norm_router"] ** 2) ** 0.5,
                                             rel=1e-5)
    assert steps[(100.0, "joint")][0]["grad_norm_router"] > 50 * log["grad_norm_router"]
    components = [k for k in steps[(1.0, "per_group")][1] if ".lora_" in k]
    for mode, same in (("per_group", True), ("joint", False)):
        a, b = steps[(1.0, mode)][1], steps[(100.0, mode)][1]
        assert all(torch.equal(a[k], b[k]) for k in components) is same, mode
    held_out = examples(4, seed=2)
    default_trainer = ComLoraTrainer(model=comlora_model(), args=arguments(tmp_path), eval_dataset=held_out)
    assert default_trainer.clip_grad == "per_group"
    with pytest.raises(ValueError, match="ComLoraTrainer: clip_grad must be one of per_group, joint, got 'all'"):
        ComLoraTrainer(model=comlora_model(), args=arguments(tmp_path), eval_dataset=held_out, clip_grad="all")

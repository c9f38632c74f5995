"""ComLoraSFTTrainer: ComLoRA inside TRL's SFTTrainer on a tiny Llama and a small chat-format dataset."""

import json
import re

import pytest
import torch

pytest.importorskip("trl")

from conftest import TINY_TEXT_VOCAB, make_tiny_llama, make_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig  # noqa: E402

from comlora import ComLoraConfig, ComLoraModel, ComLoraSFTTrainer  # noqa: E402

# the assistant's turns are wrapped in {% generation %} so that TRL can train on them alone (assistant_only_loss)
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}A: {% generation %}{{ m['content'] }}"
                 "{{ eos_token }}{% endgeneration %}\n{% else %}U: {{ m['content'] }}\n{% endif %}{% endfor %}")


def chats(n: int, offset: int = 0):
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                                            {"role": "assistant", "content": f"{i + 1}"}]}
                              for i in range(offset, offset + n)])


def test_sft_trainer_trains_comlora_on_chat_data(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    cm = ComLoraModel(make_tiny_llama(seed=0, vocab=TINY_TEXT_VOCAB),
                           ComLoraConfig(num_components=2, r=4, lora_alpha=8, selector_heads=4, selector_ffn_dim=32,
                                         selector_dropout=0.0, seed=3))
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                     per_device_eval_batch_size=4, learning_rate=0.02, logging_steps=1, report_to="none",
                     save_strategy="steps", save_steps=3, use_cpu=True, assistant_only_loss=True,
                     disable_tqdm=True, dataset_num_proc=None)
    trainer = ComLoraSFTTrainer(model=cm, args=args, train_dataset=chats(12), eval_dataset=chats(5, offset=50),
                                processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    # TRL's labels: the assistant's answer (and EOS) only, -100 on the user turn and on padding
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        assert re.fullmatch(r"\d+</s>", tokenizer.decode(ids[labels != -100])), tokenizer.decode(ids)
    before = {k: v.detach().clone() for k, v in cm.state_tensors().items()}
    trainer.train()
    changed = {k for k, v in cm.state_tensors().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("selector.") for k in changed) and any(k.endswith("lora_B") for k in changed)
    logs = [e for e in trainer.state.log_history if "lm" in e]
    assert len(logs) == 3 and all({"align", "pairwise", "eta", "lowest_loss_component"} <= set(e) for e in logs)
    # the mixin's clipping hook ran (per group, the default): each group's norm before clipping is logged
    assert trainer.clip_grad == "per_group" and all(e["grad_norm"] == pytest.approx(
        (e["grad_norm_adapter"] ** 2 + e["grad_norm_router"] ** 2) ** 0.5, rel=1e-5) for e in logs)
    assert args.gradient_checkpointing and cm.is_gradient_checkpointing      # TRL's default, through our objective
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / "comlora_model.safetensors").is_file()
    assert not list(checkpoint.glob("model*.safetensors"))

    metrics = trainer.evaluate()
    assert metrics["eval_samples"] == 5 and {"eval_similarity_0", "eval_similarity_1"} <= set(metrics)
    trainer.save_model(str(tmp_path / "winner"))
    winner = json.loads((tmp_path / "winner" / "winner.json").read_text())
    assert winner["winner"] == metrics["eval_winner"]
    assert (tmp_path / "winner" / "adapter_model.safetensors").is_file()


def test_an_sft_trainer_without_an_eval_dataset_is_refused_before_training(tmp_path):
    cm = ComLoraModel(make_tiny_llama(vocab=TINY_TEXT_VOCAB),
                           ComLoraConfig(num_components=2, r=4, selector_heads=4))
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="ComLoraSFTTrainer needs an eval_dataset: ComLoRA selects its winner on it"):
        ComLoraSFTTrainer(model=cm, args=args, train_dataset=chats(4), processing_class=make_tokenizer())


def test_packing_and_an_unknown_clip_grad_are_refused_with_a_reason(tmp_path):
    cm = ComLoraModel(make_tiny_llama(vocab=TINY_TEXT_VOCAB), ComLoraConfig(num_components=2, r=4, selector_heads=4))
    args = SFTConfig(output_dir=str(tmp_path), packing=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="does not support packing"):
        ComLoraSFTTrainer(model=cm, args=args, train_dataset=chats(4), eval_dataset=chats(2, offset=50),
                          processing_class=make_tokenizer())
    with pytest.raises(ValueError, match="ComLoraSFTTrainer: clip_grad must be one of per_group, joint, got 'none'"):
        ComLoraSFTTrainer(model=cm, args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
                          train_dataset=chats(4), eval_dataset=chats(2, offset=50),
                          processing_class=make_tokenizer(), clip_grad="none")

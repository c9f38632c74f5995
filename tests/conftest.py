"""Shared fixtures: tiny randomly initialised Llama models (milliseconds per forward)."""

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 97


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test starts without Accelerate's process-wide state: a Trainer run with bf16 leaves an AcceleratorState
    that a later Accelerator(mixed_precision="no") in the same process refuses (as accelerate's own tests reset it)."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


def make_tiny_llama(seed: int = 0, hidden_size: int = 32, layers: int = 2, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def make_batch(batch_size: int = 3, length: int = 9, seed: int = 1, prompt_len: int = 4):
    """Right-padded batch: last row 2 tokens shorter; labels -100 on the prompt and on padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -2:] = 0
    input_ids[-1, -2:] = 0
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def logits(model, batch):
    """The model's logits on ``batch`` (no gradient, no labels)."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def randomise_lora_B(layers, seed: int = 5):
    """B = 0 at init makes every LoRA / expert / component a no-op; give them non-zero weights.

    Fills each layer's ``lora_B`` (ComLoRA, MoELoRA, TeamLoRA, LoRATRF's LoRA) in order from one generator; a
    module without one (LoRATRF's ``TaskFilter``) gets its zero-initialised output factor ``T2`` instead.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            target = layer.lora_B if hasattr(layer, "lora_B") else layer.T2
            target.copy_(torch.randn(target.shape, generator=g) * 0.3)


RELATED_TARGETS = ["q_proj", "v_proj", "down_proj"]    # the MoELoRA and TeamLoRA test configs


def make_moelora_config(**overrides):
    from comlora.methods.moelora import MoeLoraConfig

    values = dict(num_experts=3, r=4, lora_alpha=8, target_modules=RELATED_TARGETS, seed=3)
    values.update(overrides)
    return MoeLoraConfig(**values)


def make_teamlora_config(**overrides):
    from comlora.methods.teamlora import TeamLoraConfig

    values = dict(num_experts=3, r=2, lora_alpha=8, target_modules=RELATED_TARGETS, seed=3)
    values.update(overrides)
    return TeamLoraConfig(**values)


def make_loratrf_config(**overrides):
    from comlora.methods.loratrf import LoraTrfConfig

    values = dict(r=4, lora_alpha=8, filter_rank=3, seed=3)
    values.update(overrides)
    return LoraTrfConfig(**values)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


@pytest.fixture
def batch():
    return make_batch()


def make_tokenizer():
    """A byte-level tokenizer with no merges (256 byte tokens + specials): offline, exact round trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(byte_vocab):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


TINY_TEXT_VOCAB = 3 + 256


def make_tiny_text_model(tmp_path, seed: int = 0):
    """A tiny random Llama + byte tokenizer saved as a local model folder (what `--model PATH` takes)."""
    model = make_tiny_llama(seed=seed, vocab=TINY_TEXT_VOCAB)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path):
    return make_tiny_text_model(tmp_path)


TASK_ANSWERS = {"boolq": ["true", "false"], "piqa": ["solution1", "solution2"],
                "social_i_qa": ["answer1", "answer2", "answer3"],
                "hellaswag": ["ending1", "ending2", "ending3", "ending4"],
                "winogrande": ["option1", "option2"], "ARC-Challenge": ["answer1", "answer2", "answer3", "answer4"],
                "ARC-Easy": ["answer1", "answer2", "answer3", "answer4"],
                "openbookqa": ["answer1", "answer2", "answer3", "answer4"]}
WITH_TRAIN = {"boolq", "ARC-Challenge", "ARC-Easy", "openbookqa"}


def option_instruction(task: str, question: str, texts: list[str]) -> str:
    """An instruction in LLM-Adapters' layout for ``task``: the options after their markers ('Answer1: ', ...),
    separated by a blank line (piqa) or a space, then 'Answer format: ...' (after a space for winogrande)."""
    labels = TASK_ANSWERS[task]
    if task == "boolq":
        return f"Please answer the following question with true or false, question: {question}\n\n" \
            "Answer format: true/false"
    options = ("\n\n" if task == "piqa" else " ").join(f"{label.capitalize()}: {text}"
                                                      for label, text in zip(labels, texts))
    before_format = " " if task == "winogrande" else "\n\n"
    return f"Please choose the correct answer to the question: {question}\n\n{options}{before_format}Answer format: " \
        + "/".join(labels)


def write_commonsense_root(root, test_items: int = 12, train_items: int = 10, with_options: bool = False):
    """A data root in the shared layout with short LLM-Adapters items for all 8 tasks; ``with_options``: with
    option texts of varied lengths in the instructions, as the real files have."""
    import json

    for task, answers in TASK_ANSWERS.items():
        folder = root / "commonsense" / task
        folder.mkdir(parents=True)
        splits = {"test": test_items, **({"train": train_items} if task in WITH_TRAIN else {})}
        for split, n in splits.items():
            items = []
            for i in range(n):
                answer = answers[i % len(answers)]
                instruction = f"{task} {split} q{i}? Answer format: {'/'.join(answers)}"
                if with_options:
                    texts = [f"option {k} of q{i}" + " really" * ((i + k) % 3) for k in range(len(answers))]
                    instruction = option_instruction(task, f"{task} {split} q{i}?" + " and why" * (i % 4), texts)
                items.append({"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
                              "answer": answer})
            (folder / f"{split}.json").write_text(json.dumps(items, indent=4))
    return root


@pytest.fixture
def commonsense_root(tmp_path):
    return write_commonsense_root(tmp_path / "data")


def train_args(model_dir, data_root, out, *extra, max_steps: int = 4):
    """``comlora train`` arguments for a few steps of a tiny model on the small commonsense fixture."""
    return ["train", "--model", str(model_dir), "--data-root", str(data_root), "--out", str(out), "--device", "cpu",
            "--train-per-task", "2", "--val-size", "6", "--eval-size", "4", "--batch-size", "4", "--max-steps",
            str(max_steps), "--cutoff-len", "256", "--lr", "0.01", "--window", "2", *extra]

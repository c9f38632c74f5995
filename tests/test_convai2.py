import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from comlora.data.convai2 import (
    INSTRUCTION,
    Dialogue,
    convai2_examples,
    convai2_training_items,
    load_convai2,
    split_dialogues,
)
from comlora.data.items import data_root, format_prompt, load_items
from comlora.evaluation.convai2 import evaluate_convai2, first_line, markdown_table
from comlora.evaluation.text_metrics import text_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "convai2" / "dialogues.txt"
MALFORMED = Path(__file__).parent / "fixtures" / "convai2_malformed"


def real_file() -> Path:
    try:
        return data_root() / "convai2" / "valid_self_original_no_cands.txt"
    except FileNotFoundError:
        pytest.skip("no shared data root (set COMLORA_DATA)")


def test_parse_fixture():
    dialogues = load_convai2(FIXTURE)
    assert [(d.index, d.line, len(d.persona), len(d.turns)) for d in dialogues] == [(0, 1, 2, 3), (1, 6, 1, 2),
                                                                                    (2, 9, 3, 1)]
    assert dialogues[0].persona == ["i have a red bicycle.", "i work as a baker."]
    assert dialogues[0].turns[1] == ("nice ! what kind ?", "sourdough , my favorite .")


@pytest.mark.parametrize("name, line, message", [
    ("no_number.txt", 3, "expected '<number> <text>'"),
    ("bad_count.txt", 3, "line number 4 breaks the dialogue's count"),
    ("no_tab.txt", 3, "a turn needs"),
    ("persona_after_turn.txt", 3, "persona line after the dialogue's first turn"),
    ("no_turn.txt", 1, "dialogue 0 has no turn"),
])
def test_malformed_file_names_file_and_line(name, line, message):
    with pytest.raises(ValueError, match=f"{MALFORMED / name}:{line}: {message}"):
        load_convai2(MALFORMED / name)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such ConvAI2 file"):
        load_convai2(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="holds no dialogue"):
        load_convai2(tmp_path / "empty.txt")


def fake_dialogues(n: int) -> list[Dialogue]:
    return [Dialogue(index=i, line=1 + 3 * i, persona=[f"p{i}"], turns=[(f"u{i}", f"r{i}")]) for i in range(n)]


def test_split_is_by_dialogue_deterministic_and_complete():
    dialogues = fake_dialogues(53)
    a = split_dialogues(dialogues, seed=0)
    assert a == split_dialogues(dialogues, seed=0)
    assert a != split_dialogues(dialogues, seed=1)
    assert [len(a[k]) for k in ("train", "validation", "test")] == [42, 6, 5]   # cuts at round(42.4), round(47.7)
    indices = [[d.index for d in a[k]] for k in ("train", "validation", "test")]
    assert sorted(sum(indices, [])) == list(range(53))                        # disjoint and complete
    assert all(ix == sorted(ix) for ix in indices)                            # each split in file order
    b = split_dialogues(dialogues, seed=0, fractions=(0.5, 0.0, 0.5))
    assert [len(b[k]) for k in ("train", "validation", "test")] == [26, 0, 27]  # round(26.5) == 26
    with pytest.raises(ValueError, match="summing to 1"):
        split_dialogues(dialogues, fractions=(0.8, 0.1, 0.2))


def test_split_of_the_real_file():
    dialogues = load_convai2(real_file())
    assert len(dialogues) == 1000
    assert sum(len(d.turns) for d in dialogues) == 7801 and sum(len(d.persona) for d in dialogues) == 4483
    splits = split_dialogues(dialogues, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 800, "validation": 100, "test": 100}
    ids = {k: {d.index for d in v} for k, v in splits.items()}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
    assert not (ids["validation"] & ids["test"])
    assert sum(len(d.turns) for v in splits.values() for d in v) == 7801
    again = split_dialogues(load_convai2(real_file()), seed=0)
    assert {k: [d.index for d in v] for k, v in again.items()} == {k: [d.index for d in v] for k, v in splits.items()}
    examples = {k: convai2_examples(v) for k, v in splits.items()}
    assert {e["dialogue"] for e in examples["test"]} == ids["test"]


def test_examples_and_history_window():
    dialogues = load_convai2(FIXTURE)
    examples = convai2_examples(dialogues)
    assert len(examples) == 6 and [e["turn"] for e in examples[:3]] == [0, 1, 2]
    assert examples[2]["prompt"] == (
        f"{INSTRUCTION}\n\nPersona:\ni have a red bicycle.\ni work as a baker.\n\nConversation:\n"
        "Partner: hi , how are you ?\nYou: i am fine , just baked some bread .\n"
        "Partner: nice ! what kind ?\nYou: sourdough , my favorite .\n"
        "Partner: do you ride bikes ?")
    assert examples[2]["response"] == "yes , my red bicycle every morning ."
    one = convai2_examples(dialogues, history_turns=1)[2]["prompt"]
    assert "hi , how are you" not in one and "Partner: nice ! what kind ?\nYou: sourdough" in one
    zero = convai2_examples(dialogues, history_turns=0)[2]["prompt"]
    assert zero.endswith("Conversation:\nPartner: do you ride bikes ?")
    with pytest.raises(ValueError, match="history_turns"):
        convai2_examples(dialogues, history_turns=-1)


def test_training_items_load_as_llm_adapters_items(tmp_path):
    items = convai2_training_items(load_convai2(FIXTURE), history_turns=2)
    assert items[0]["output"] == items[0]["answer"] == "i am fine , just baked some bread ."
    assert items[0]["input"] == "" and items[0]["instruction"].startswith(INSTRUCTION)
    path = tmp_path / "convai2_train.json"
    path.write_text(json.dumps(items))
    assert load_items(path) == items


@pytest.mark.parametrize("text, expected", [("  hi there .\nPartner: more", "hi there ."), ("\n\n ok ", "ok"),
                                            ("", "")])
def test_first_line(text, expected):
    assert first_line(text) == expected


def test_evaluate_with_canned_generations(monkeypatch):
    examples = convai2_examples(load_convai2(FIXTURE))
    seen = {}

    def fake_generate(model, tok, prompts, **kw):
        seen.update(prompts=prompts, kw=kw)
        return [ex["response"] + "\nPartner: go on" if i % 2 == 0 else "i like cats ." for i, ex in enumerate(examples)]

    monkeypatch.setattr("comlora.evaluation.convai2.generate_texts", fake_generate)
    r = evaluate_convai2(None, None, examples, num_beams=4, length_penalty=0.8, no_repeat_ngram_size=3, bertscore=False)
    assert seen["prompts"][0] == format_prompt({"instruction": examples[0]["prompt"], "input": ""})
    assert seen["kw"]["num_beams"] == 4 and seen["kw"]["length_penalty"] == 0.8
    assert seen["kw"]["no_repeat_ngram_size"] == 3
    predictions = [row["prediction"] for row in r["items"]]
    assert predictions[0] == examples[0]["response"] and predictions[1] == "i like cats ."
    expected = text_metrics(predictions, [ex["response"] for ex in examples], bertscore=False)
    assert r["metrics"] == expected
    assert r["metrics"]["bertscore_f1"] is None and r["metrics"]["average"] is None
    assert "bertscore" in r["metrics"]["errors"]
    assert markdown_table({"canned": r}).splitlines()[0] == \
        "| model | BLEU | METEOR | R-L | BERT F1 | BERT R | BERT P | Average |"


def test_evaluate_on_tiny_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = convai2_examples(load_convai2(FIXTURE), history_turns=0)[:3]
    r = evaluate_convai2(model, tok, examples, num_beams=2, max_new_tokens=4, batch_size=2, bertscore=False)
    assert r["n"] == 3 and len(r["items"]) == 3
    assert r["metrics"]["bleu"] is not None and r["metrics"]["rouge_l"] >= 0


def test_train_size_draws_a_nested_seeded_subset_of_the_training_turns():
    from comlora.training.config import TrainConfig
    from comlora.training.data import training_items

    root = real_file().parents[1]
    everything, validation = training_items(TrainConfig(data="convai2", data_root=str(root), data_seed=0))
    small, same_validation = training_items(TrainConfig(data="convai2", data_root=str(root), data_seed=0,
                                                        train_size=100, seed=5))
    larger, _ = training_items(TrainConfig(data="convai2", data_root=str(root), data_seed=0, train_size=300))
    assert len(small) == 100 and len(larger) == 300 and same_validation == validation
    assert all(item in larger for item in small)                   # nested: the same permutation's prefix
    positions = [everything.index(item) for item in larger]
    assert positions == sorted(positions)                          # in the file's order
    assert len({(i["dialogue"], i["turn"]) for i in larger}) == 300
    with pytest.raises(ValueError, match=r"train_size=9999 but only \d+ training items"):
        training_items(TrainConfig(data="convai2", data_root=str(root), train_size=9999))
    with pytest.raises(ValueError, match="train_size is for the other data sources"):
        TrainConfig(data="commonsense-mini", train_size=10)

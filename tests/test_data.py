import json

import pytest
from conftest import make_tokenizer

from comlora.data.commonsense import COMMONSENSE_TASKS, build_commonsense_mini
from comlora.data.items import collate, data_root, format_prompt, load_items, tokenize_item


def test_commonsense_mini_is_disjoint_and_deterministic(commonsense_root):
    a = build_commonsense_mini(commonsense_root, eval_size=5, train_per_task=3, val_size=10, seed=1)
    b = build_commonsense_mini(commonsense_root, eval_size=5, train_per_task=3, val_size=10, seed=1)
    assert a == b
    assert len(a.train) == 24 and len(a.validation) == 10 and all(len(v) == 5 for v in a.evaluation.values())
    key = lambda item: (item["task"], item.get("source", "test"), item["index"])  # noqa: E731
    evaluation = {key(i) for items in a.evaluation.values() for i in items}
    train, validation = {key(i) for i in a.train}, {key(i) for i in a.validation}
    assert len(train) == 24 and len(validation) == 10
    assert not (train & validation) and not (train & evaluation) and not (validation & evaluation)
    # tasks without train.json train on the rest of test.json
    assert {i["source"] for i in a.train if i["task"] == "piqa"} == {"test"}
    assert {i["source"] for i in a.train if i["task"] == "boolq"} == {"train"}
    # the evaluation subset depends only on seed, task and eval_size
    c = build_commonsense_mini(commonsense_root, eval_size=5, train_per_task=7, val_size=2, seed=1)
    assert c.evaluation == a.evaluation


def test_commonsense_mini_on_the_real_data_is_disjoint():
    root = data_root()
    suite = build_commonsense_mini(root, eval_size=100, train_per_task=25, val_size=120, seed=0)
    texts = lambda items: {(i["task"], i["instruction"], i["output"]) for i in items}  # noqa: E731
    evaluation = set().union(*(texts(v) for v in suite.evaluation.values()))
    # compared by content: a train.json item identical to a test item would count as overlap too
    assert not texts(suite.train) & evaluation and not texts(suite.validation) & evaluation
    assert not texts(suite.train) & texts(suite.validation)
    assert set(suite.evaluation) == set(COMMONSENSE_TASKS)


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ("[]", "holds no item"),
    ('{"a": 1}', "expected a JSON list"),
    ('[{"instruction": "x", "output": "y"}, {"instruction": "x"}]', "item 1 has no field 'output'"),
    ('[{"instruction": 3, "output": "y"}]', "item 0 field 'instruction' must be a string"),
])
def test_malformed_data_names_file_item_and_field(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_items(path)
    assert str(path) in str(err.value)


def test_unknown_task_and_missing_answer(commonsense_root, tmp_path):
    with pytest.raises(ValueError, match="unknown commonsense task 'nope'"):
        build_commonsense_mini(commonsense_root, tasks=["nope"])
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    with pytest.raises(ValueError, match="item 0 has no field 'answer'"):
        load_items(path, require_answer=True)


def test_folder_of_files_and_prompt_templates(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "i1", "output": "o1"}]))
    (tmp_path / "sub" / "b.json").write_text(json.dumps([{"instruction": "i2", "input": "ctx", "output": "o2"}]))
    items = load_items(tmp_path)
    assert [i["instruction"] for i in items] == ["i1", "i2"]
    assert format_prompt(items[0]).endswith("### Instruction:\ni1\n\n### Response:\n")
    assert "### Input:\nctx\n\n### Response:\n" in format_prompt(items[1])


def test_tokenisation_masks_the_prompt_and_appends_eos():
    tok = make_tokenizer()
    item = {"instruction": "Say yes.", "input": "", "output": "yes"}
    prompt_len = len(tok(format_prompt(item))["input_ids"])
    ex = tokenize_item(tok, item, cutoff_len=512)
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert ex["labels"][:prompt_len] == [-100] * prompt_len
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:]
    assert tok.decode(ex["input_ids"][prompt_len:-1]) == "yes"
    full = tokenize_item(tok, item, cutoff_len=512, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]
    cut = tokenize_item(tok, item, cutoff_len=20)             # truncated inside the prompt: no target token
    assert len(cut["input_ids"]) == 20 and set(cut["labels"]) == {-100}


def test_collate_right_pads():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                    pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]

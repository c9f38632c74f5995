"""The options of LLM-Adapters items as texts (data/options.py) and the text answer format of training."""

import json

import pytest
from conftest import make_tokenizer, option_instruction, write_commonsense_root

from comlora.data.commonsense import COMMONSENSE_TASKS
from comlora.data.items import IGNORE_INDEX, data_root, format_prompt, load_items, tokenize_item
from comlora.data.options import item_options, parse_options
from comlora.training.config import TrainConfig
from comlora.training.data import training_items

TEST_SIZES = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "hellaswag": 10042, "winogrande": 1267,
              "ARC-Challenge": 1172, "ARC-Easy": 2376, "openbookqa": 500}


def real_test_file(task: str):
    try:
        path = data_root() / "commonsense" / task / "test.json"
    except FileNotFoundError:
        pytest.skip("no shared data root (set COMLORA_DATA)")
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.mark.parametrize("task", COMMONSENSE_TASKS)
def test_every_item_of_the_real_test_files_parses(task):
    items = load_items(real_test_file(task), require_answer=True)
    assert len(items) == TEST_SIZES[task]
    counts = {}
    for i, item in enumerate(items):
        options, answer = item_options(dict(item, task=task, index=i))
        assert options.labels == tuple(item["instruction"].rsplit("Answer format: ", 1)[1].strip().split("/"))
        assert options.labels[answer] == item["answer"]                      # the gold label maps to its option
        assert all(text and text == text.strip() for text in options.texts)
        if task != "boolq":     # each text is what follows its marker, and the next marker (or the format line) ends it
            ends = [f"{label.capitalize()}: " for label in options.labels[1:]] + ["Answer format: "]
            for label, text, end in zip(options.labels, options.texts, ends):
                after = item["instruction"].rsplit(f"{label.capitalize()}: ", 1)[1].lstrip()
                assert after.startswith(text) and after[len(text):].lstrip().startswith(end), (i, label)
        # the cloze question: the instruction up to its options (BoolQ: up to its answer format), no option text
        assert item["instruction"].startswith(options.question) and options.question == options.question.strip()
        rest = item["instruction"][len(options.question):]
        assert rest.lstrip().startswith("Answer format: " if task == "boolq" else
                                        f"{options.labels[0].capitalize()}: "), i
        assert "Answer format" not in options.question
        counts[len(options.texts)] = counts.get(len(options.texts), 0) + 1
    expected = {"boolq": {2: 3270}, "piqa": {2: 1838}, "social_i_qa": {3: 1954}, "hellaswag": {4: 10042},
                "winogrande": {2: 1267}, "ARC-Challenge": {3: 4, 4: 1165, 5: 3}, "ARC-Easy": {3: 7, 4: 2365, 5: 4},
                "openbookqa": {4: 500}}
    assert counts == expected[task]


@pytest.mark.parametrize("task, texts", [
    ("piqa", ["Provide a cage ", "Use  jeans material"]),
    ("winogrande", ["Sarah", "Maria"]),
    ("social_i_qa", ["make a new plan", "Go home: and see Riley", "Find somewhere to go"]),
    ("hellaswag", ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."]),
])
def test_parse_options_of_each_layout(task, texts):
    options = parse_options(option_instruction(task, "Which one? Answer1: not an option here", texts))
    assert options.texts == tuple(t.strip() for t in texts)
    assert options.labels[0].startswith({"piqa": "solution", "winogrande": "option", "social_i_qa": "answer",
                                         "hellaswag": "ending"}[task])
    assert parse_options(option_instruction("boolq", "is it?", [])).texts == ("true", "false")
    assert "Which one? Answer1: not an option here" in options.question             # the question, whole
    assert not any(t.strip() in options.question for t in texts)                    # and none of the options


def test_cloze_question_by_hand():
    instruction = ("Please choose the correct answer to the question: Which? Answer1: inside the question\n\n"
                   "Answer1: red Answer2: blue\n\nAnswer format: answer1/answer2")
    assert parse_options(instruction).question == \
        "Please choose the correct answer to the question: Which? Answer1: inside the question"
    boolq = "Please answer the following question with true or false, question: is it?\n\nAnswer format: true/false"
    assert parse_options(boolq).question == "Please answer the following question with true or false, question: is it?"


@pytest.mark.parametrize("instruction, message", [
    ("Which one?\n\nAnswer1: a Answer2: b", "no 'Answer format:"),
    ("Which one?\n\nAnswer1: a Answer3: b\n\nAnswer format: answer1/answer2", "not one block"),
    ("Which one? Answer1: a Answer2: b\n\nAnswer format: answer1/answer2", "not one block"),
    ("Which one?\n\nAnswer1:  Answer2: b\n\nAnswer format: answer1/answer2", "option answer1 has no text"),
])
def test_unparsable_options_are_clear_errors(instruction, message):
    with pytest.raises(ValueError, match=message):
        parse_options(instruction)


def test_gold_label_outside_the_options_names_the_item():
    item = {"instruction": option_instruction("winogrande", "q?", ["a", "b"]), "answer": "option3",
            "task": "winogrande", "index": 7}
    with pytest.raises(ValueError, match="winogrande 7: .*'option3' is none of the item's labels option1/option2"):
        item_options(item)


def test_text_answer_format_trains_on_the_correct_option(tmp_path):
    root = write_commonsense_root(tmp_path / "data", with_options=True)
    common = dict(data_root=str(root), train_per_task=2, val_size=6, eval_size=4)
    label_train, label_val = training_items(TrainConfig(**common))
    text_train, text_val = training_items(TrainConfig(answer_format="text", **common))
    assert [i["instruction"] for i in text_train] == [i["instruction"] for i in label_train]      # the same items
    assert [i["instruction"] for i in text_val] == [i["instruction"] for i in label_val]
    for label_item, text_item in zip(label_train + label_val, text_train + text_val):
        options = parse_options(label_item["instruction"])
        assert label_item["output"] == f"the correct answer is {label_item['answer']}"
        assert text_item["output"] == options.texts[options.labels.index(label_item["answer"])]
        assert text_item["answer"] == label_item["answer"]
    # the response tokens are the option's text and EOS after exactly the prompt that --scoring loglik scores after
    tok = make_tokenizer()
    item = text_train[0]
    example = tokenize_item(tok, item, cutoff_len=1024)
    target = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tok.decode(target[:-1]) == item["output"] and target[-1] == tok.eos_token_id
    assert tok.decode(example["input_ids"][:len(example["input_ids"]) - len(target)]) == format_prompt(item)


def test_cloze_answer_format_trains_on_the_option_after_the_question_alone(tmp_path):
    root = write_commonsense_root(tmp_path / "data", with_options=True)
    common = dict(data_root=str(root), train_per_task=2, val_size=6, eval_size=4)
    text_train, text_val = training_items(TrainConfig(answer_format="text", **common))
    cloze_train, cloze_val = training_items(TrainConfig(answer_format="cloze", **common))
    assert len(cloze_train) == len(text_train) and len(cloze_val) == len(text_val)
    for text_item, cloze_item in zip(text_train + text_val, cloze_train + cloze_val):
        options = parse_options(text_item["instruction"])
        assert cloze_item["instruction"] == options.question and cloze_item["output"] == text_item["output"]
        assert "Answer format" not in cloze_item["instruction"] and cloze_item["answer"] == text_item["answer"]
    with pytest.raises(ValueError, match="answer_format cloze applies to commonsense items"):
        TrainConfig(data="convai2", answer_format="cloze")


def test_text_answer_format_of_a_json_file_and_its_errors(tmp_path):
    path = tmp_path / "items.json"
    path.write_text(json.dumps([{"instruction": option_instruction("piqa", f"q{i}?", [f"s{i}a", f"s{i}b"]),
                                 "input": "", "output": "the correct answer is solution2", "answer": "solution2"}
                                for i in range(5)]))
    train, validation = training_items(TrainConfig(data=str(path), val_size=2, answer_format="text"))
    assert sorted(i["output"] for i in train + validation) == [f"s{i}b" for i in range(5)]
    path.write_text(json.dumps([{"instruction": "no options here", "output": "x", "answer": "x"}] * 3))
    with pytest.raises(ValueError, match="cannot read its answer options: no 'Answer format:"):
        training_items(TrainConfig(data=str(path), val_size=1, answer_format="text"))
    with pytest.raises(ValueError, match="answer_format must be one of label, text, cloze, got 'letters'"):
        TrainConfig(answer_format="letters")
    for data in ("convai2", "mmlu", "mmlu:test"):
        with pytest.raises(ValueError,
                           match=f"answer_format text applies to commonsense items .* not to data '{data}'"):
            TrainConfig(data=data, answer_format="text")

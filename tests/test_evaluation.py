import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from comlora.evaluation.commonsense import evaluate_commonsense, extract_answer, markdown_table


@pytest.mark.parametrize("task, response, expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "no keyword here", None),                              # no keyword: wrong
    ("piqa", "solution2 or maybe solution1", "solution2"),           # several: the first counts
    ("boolq", "that is untrue", "true"),                             # inside another word: still matches (LLM-Adapters)
    ("boolq", "The correct answer is True", None),                   # case-sensitive, as LLM-Adapters
    ("ARC-Easy", "### Instruction:\nanswer1/answer2\n\n### Response:\nthe correct answer is answer2", "answer2"),
    ("winogrande", "  option2  ", "option2"),
    ("hellaswag", "ending5 ending3", "ending3"),
    ("social_i_qa", "answer5", "answer5"),
])
def test_first_keyword_extraction(task, response, expected):
    assert extract_answer(task, response) == expected


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown commonsense task"):
        extract_answer("mnli", "x")


def test_evaluate_counts_accuracy_per_task_and_average(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    items = {"boolq": [{"instruction": "q", "answer": "true"}, {"instruction": "r", "answer": "false"}],
             "piqa": [{"instruction": "s", "answer": "solution1"}]}
    result = evaluate_commonsense(model, tok, items, limit=None, batch_size=2, max_new_tokens=3, num_beams=2)
    for task, rows in items.items():
        got = result["tasks"][task]
        assert got["n"] == len(rows)
        expected = 100.0 * sum(extract_answer(task, r["response"]) == r["answer"] for r in got["items"]) / len(rows)
        assert got["accuracy"] == expected
    assert result["average"] == (result["tasks"]["boolq"]["accuracy"] + result["tasks"]["piqa"]["accuracy"]) / 2
    table = markdown_table({"tiny": result})
    assert table.splitlines()[0] == "| model | boolq | piqa | avg |"


def test_accuracy_from_known_responses(monkeypatch):
    canned = {"q1": "the correct answer is true", "q2": "True", "q3": "false, not true", "q4": "solution2"}
    monkeypatch.setattr("comlora.evaluation.commonsense.generate_texts",
                        lambda model, tok, prompts, **kw: [canned[p.split("### Instruction:\n")[1][:2]]
                                                           for p in prompts])
    items = {"boolq": [{"instruction": "q1", "answer": "true"}, {"instruction": "q2", "answer": "true"},
                       {"instruction": "q3", "answer": "false"}],
             "piqa": [{"instruction": "q4", "answer": "solution1"}]}
    result = evaluate_commonsense(None, None, items, limit=None)
    assert result["tasks"]["boolq"]["accuracy"] == pytest.approx(200 / 3)
    assert [r["prediction"] for r in result["tasks"]["boolq"]["items"]] == ["true", None, "false"]
    assert result["tasks"]["piqa"]["accuracy"] == 0.0
    assert result["average"] == pytest.approx(100 / 3)
    assert evaluate_commonsense(None, None, items, limit=1)["tasks"]["boolq"]["n"] == 1


def test_component_label_and_its_parse_are_one_pair():
    from comlora.evaluation.results import ComponentName, component_label, parse_component_label

    assert component_label("run", 0, False) == "run-component0"
    assert component_label("run", 3, True) == "run-component3-winner"
    for run, k, winner in [("run", 0, False), ("seed-2", 11, True), ("exp-component1", 0, True)]:
        label = component_label(run, k, winner)
        for name in (label, f"commonsense-{label}", f"commonsense-{label}-llama.cpp-limit5"):
            assert parse_component_label(name) == ComponentName(k, winner)
    assert parse_component_label("commonsense-base-smollm2-135m") is None
    assert parse_component_label("commonsense-run-20260101") is None

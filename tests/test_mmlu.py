import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from comlora.data.items import data_root, load_items
from comlora.data.items import format_prompt as alpaca_prompt
from comlora.data.mmlu import CATEGORIES, LETTERS, SUBJECT_CATEGORIES, format_prompt, load_mmlu, mmlu_training_items
from comlora.evaluation.mmlu import aggregate, evaluate_mmlu, extract_letter, letter_logprobs, markdown_table

FIXTURES = Path(__file__).parent / "fixtures"


def real_root() -> Path:
    try:
        return data_root()
    except FileNotFoundError:
        pytest.skip("no shared data root (set COMLORA_DATA)")


# ----------------------------------------------------------------------------- loading

def test_load_fixture_rows():
    items = load_mmlu(FIXTURES, "test")
    assert [(i["subject"], i["index"]) for i in items] == [("abstract_algebra", 0), ("abstract_algebra", 1),
                                                           ("abstract_algebra", 2), ("anatomy", 0), ("anatomy", 1)]
    second = items[1]
    assert second["question"] == "Let G be a group, and H a subgroup.\nWhich statement is true?"  # quoted newline
    assert second["choices"][1] == "the order of H divides the order of G, always"                # quoted comma
    assert second["answer"] == 1
    assert len(load_mmlu(FIXTURES, "dev")) == 5
    assert [i["subject"] for i in load_mmlu(FIXTURES / "mmlu", "test", subjects=["anatomy"])] == ["anatomy"] * 2
    assert [(i["subject"], i["index"]) for i in load_mmlu(FIXTURES / "mmlu" / "test", "test", limit=1)] == \
        [("abstract_algebra", 0), ("anatomy", 0)]                                                 # limit: per subject


@pytest.mark.parametrize("folder, line, message", [
    ("fields", 3, "expected 6 fields"),
    ("answer", 4, "field 'answer' must be 0, 1, 2 or 3, got 'C'"),  # the row after a two-line row starts on line 4
    ("header", 1, "expected the header"),
    ("quote", 3, "malformed CSV"),
])
def test_malformed_csv_names_file_and_line(folder, line, message):
    path = FIXTURES / "mmlu_malformed" / folder / "anatomy_test.csv"
    with pytest.raises(ValueError, match=f"{path}:{line}: {message}"):
        load_mmlu(path.parent, "test")


def test_missing_subject_and_unknown_split():
    with pytest.raises(FileNotFoundError, match="virology_test.csv"):
        load_mmlu(FIXTURES, "test", subjects=["virology"])
    with pytest.raises(ValueError, match="unknown MMLU split"):
        load_mmlu(FIXTURES, "val")
    with pytest.raises(FileNotFoundError, match="no MMLU dev files"):
        load_mmlu(FIXTURES / "convai2", "dev")


def test_subject_categories_hendrycks_grouping():
    assert len(SUBJECT_CATEGORIES) == 57
    sizes = {c: sum(v == c for v in SUBJECT_CATEGORIES.values()) for c in CATEGORIES}
    assert sizes == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}
    assert SUBJECT_CATEGORIES["high_school_statistics"] == "STEM"
    assert SUBJECT_CATEGORIES["moral_scenarios"] == "humanities"
    assert SUBJECT_CATEGORIES["econometrics"] == "social sciences"
    assert SUBJECT_CATEGORIES["professional_accounting"] == "other"


def test_real_files_parse_and_match_the_categories():
    root = real_root()
    test = load_mmlu(root, "test")
    dev = load_mmlu(root, "dev")
    assert len(test) == 14042 and len(dev) == 285
    assert {i["subject"] for i in test} == set(SUBJECT_CATEGORIES) == {i["subject"] for i in dev}


# ----------------------------------------------------------------------------- prompts

def test_zero_shot_prompt_exact_text():
    item = load_mmlu(FIXTURES, "test")[0]
    assert format_prompt(item) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the degree of Q(sqrt(2)) over Q.\nA. 0\nB. 2\nC. 1\nD. 4\nAnswer:")


def test_two_shot_prompt_exact_text():
    item = load_mmlu(FIXTURES, "test")[0]
    shots = load_mmlu(FIXTURES, "dev", subjects=["abstract_algebra"])[:2]
    assert format_prompt(item, shots) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "What is the order of the group Z_6?\nA. 3\nB. 6\nC. 2\nD. 12\nAnswer: B\n\n"
        "Is every cyclic group abelian?\nA. Yes\nB. No\nC. Only if finite\nD. Only if infinite\nAnswer: A\n\n"
        "Find the degree of Q(sqrt(2)) over Q.\nA. 0\nB. 2\nC. 1\nD. 4\nAnswer:")


@pytest.mark.parametrize("response, expected", [
    (" B", "B"), ("B.", "B"), ("(C) because", "C"), ("the correct answer is D", "D"), ("\nA. push factors", "A"),
    ("Answer: C\n\nThe following", "C"), ("D) 42", "D"),
    ("Apple and Banana", None),      # inside words
    ("AB", None), ("ABCD", None),    # letter runs are not a choice
    ("b", None), ("a cat", None),    # lower case is not a choice (and "a" is an article)
    ("E", None), ("", None), ("C3PO then B", "B"),
    ("A good guess is B", "A"),      # documented limit: a sentence-initial article 'A' counts
])
def test_extract_letter(response, expected):
    assert extract_letter(response) == expected


def test_training_items_round_trip(tmp_path):
    items = load_mmlu(FIXTURES, "dev")
    train = mmlu_training_items(FIXTURES, "dev")
    assert len(train) == len(items)
    for item, t in zip(items, train):
        assert t["instruction"] + "\nAnswer:" == format_prompt(item)          # zero-shot prompt round-trips
        assert t["answer"] == LETTERS[item["answer"]] == extract_letter(t["output"])
        assert t["output"] == f"the correct answer is {t['answer']}" and t["input"] == ""
    path = tmp_path / "mmlu_train.json"
    path.write_text(json.dumps(train))
    assert load_items(path, require_answer=True) == train                    # the trainer's loader accepts them


# ----------------------------------------------------------------------------- aggregation

def test_aggregate_by_hand():
    rows = ([{"subject": "abstract_algebra", "correct": c} for c in (True, True, False, False)]    # 2/4 = 50
            + [{"subject": "anatomy", "correct": c} for c in (True, False)]                        # 1/2 = 50
            + [{"subject": "virology", "correct": c} for c in (True, True, True, True)]            # 4/4 = 100
            + [{"subject": "philosophy", "correct": False}]                                        # 0/1 = 0
            + [{"subject": "my_own_subject", "correct": True}])                                    # 1/1 = 100
    r = aggregate(rows)
    assert {s: v["accuracy"] for s, v in r["subjects"].items()} == {
        "abstract_algebra": 50.0, "anatomy": 50.0, "my_own_subject": 100.0, "philosophy": 0.0, "virology": 100.0}
    assert r["categories"]["STEM"] == {"n": 4, "correct": 2, "subjects": 1, "accuracy": 50.0}
    assert r["categories"]["other"] == {"n": 6, "correct": 5, "subjects": 2, "accuracy": pytest.approx(500 / 6)}
    assert r["categories"]["humanities"]["accuracy"] == 0.0
    assert r["categories"]["uncategorized"]["n"] == 1
    assert list(r["categories"]) == ["STEM", "humanities", "other", "uncategorized"]
    assert r["micro_average"] == pytest.approx(100 * 8 / 12)                  # items pooled
    assert r["macro_average"] == pytest.approx((50 + 50 + 100 + 0 + 100) / 5)  # subjects equal
    assert r["n"] == 12


# ----------------------------------------------------------------------------- scoring on a tiny model

def tiny(tmp_path_model_dir):
    return (AutoModelForCausalLM.from_pretrained(tmp_path_model_dir).eval(),
            AutoTokenizer.from_pretrained(tmp_path_model_dir))


def direct_continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        lp = model(torch.tensor([full])).logits[0].log_softmax(-1)
    return sum(lp[p - 1, full[p]].item() for p in range(len(ctx), len(full)))


def test_logits_mode_matches_a_direct_forward_pass(tiny_model_dir):
    model, tok = tiny(tiny_model_dir)
    items = load_mmlu(FIXTURES, "test")
    contexts = [format_prompt(i) for i in items]                   # different lengths: left padding is exercised
    assert len({len(c) for c in contexts}) == len(contexts)
    scores, info = letter_logprobs(model, tok, contexts, batch_size=3)
    assert info["continuation_tokens"]["A"] == ["Ġ", "A"] and not info["single_token"]  # byte tokenizer: 2 tokens
    for context, got in zip(contexts, scores):
        expected = [direct_continuation_logprob(model, tok, context, " " + letter) for letter in LETTERS]
        assert got == pytest.approx(expected, abs=1e-4)
    result = evaluate_mmlu(model, tok, items, mode="logits", batch_size=2)
    for row, lp in zip(result["items"], scores):
        assert row["logprobs"] == pytest.approx(lp, abs=1e-4)
        assert row["prediction"] == LETTERS[max(range(4), key=lambda k: lp[k])]


def letter_merging_tokenizer():
    """The conftest byte tokenizer plus merges 'Ġ'+'A'..'D': ' A' is then one token, as in GPT-2-style BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for letter in LETTERS:
        vocab["Ġ" + letter] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", letter) for letter in LETTERS]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_logits_mode_single_token_path():
    tok = letter_merging_tokenizer()
    model = make_tiny_llama(vocab=len(tok))
    contexts = [format_prompt(i) for i in load_mmlu(FIXTURES, "test")]
    scores, info = letter_logprobs(model, tok, contexts, batch_size=2)
    assert info["single_token"] and info["continuation_tokens"]["C"] == ["ĠC"]
    for context, got in zip(contexts, scores):
        ids = tok(context)["input_ids"]
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        assert got == pytest.approx([lp[tok.convert_tokens_to_ids("Ġ" + L)].item() for L in LETTERS], abs=1e-4)


def test_left_truncation_keeps_the_end(tiny_model_dir):
    model, tok = tiny(tiny_model_dir)
    context = format_prompt(load_mmlu(FIXTURES, "test")[1])
    scores, info = letter_logprobs(model, tok, [context], max_length=40)
    assert info["truncated"] == [True]
    ctx = tok(context)["input_ids"][-(40 - 2):]                   # room for the 2-token continuation
    with torch.no_grad():
        for letter, got in zip(LETTERS, scores[0]):
            full = ctx + tok(" " + letter, add_special_tokens=False)["input_ids"]
            lp = model(torch.tensor([full])).logits[0].log_softmax(-1)
            assert got == pytest.approx(lp[-3, full[-2]].item() + lp[-2, full[-1]].item(), abs=1e-4)


def test_evaluate_generate_mode_with_canned_responses(monkeypatch):
    items = load_mmlu(FIXTURES, "test")
    canned = iter([" B\n\nThe following", "I think (D)", "no idea", "A", " C."])
    seen = {}

    def fake_generate(model, tok, prompts, **kw):
        seen["prompts"] = prompts
        return [next(canned) for _ in prompts]

    monkeypatch.setattr("comlora.evaluation.mmlu.generate_texts", fake_generate)
    dev = load_mmlu(FIXTURES, "dev")
    r = evaluate_mmlu(None, None, items, shots_per_subject=1, dev_items=dev, mode="generate")
    assert [row["prediction"] for row in r["items"]] == ["B", "D", None, "A", "C"]
    assert [row["correct"] for row in r["items"]] == [True, False, False, True, True]
    assert r["subjects"]["abstract_algebra"]["accuracy"] == pytest.approx(100 / 3)
    assert r["micro_average"] == pytest.approx(60.0)
    assert r["macro_average"] == pytest.approx((100 / 3 + 100) / 2)
    assert seen["prompts"][0] == format_prompt(items[0], dev[:1])
    assert seen["prompts"][3] == format_prompt(items[3], dev[3:4])            # anatomy's first dev row as its shot

    canned = iter(["the correct answer is B"] * 5)
    r = evaluate_mmlu(None, None, items, mode="generate", prompt_style="alpaca")
    assert seen["prompts"][0] == alpaca_prompt(mmlu_training_items(FIXTURES, "test")[0])
    assert r["items"][0]["correct"] and r["micro_average"] == pytest.approx(60.0)


def test_evaluate_end_to_end_on_tiny_model(tiny_model_dir):
    model, tok = tiny(tiny_model_dir)
    items, dev = load_mmlu(FIXTURES, "test"), load_mmlu(FIXTURES, "dev")
    r = evaluate_mmlu(model, tok, items, shots_per_subject=1, dev_items=dev, mode="logits", batch_size=4)
    assert r["n"] == 5 and r["truncated"] == 0 and r["settings"]["max_length"] == 512
    assert set(r["categories"]) == {"STEM", "other"}
    r = evaluate_mmlu(model, tok, items, mode="logits", prompt_style="alpaca", batch_size=4)
    assert all(len(row["logprobs"]) == 4 for row in r["items"])
    r = evaluate_mmlu(model, tok, items[:2], mode="generate", batch_size=2, max_new_tokens=2)
    assert all(isinstance(row["response"], str) for row in r["items"])
    assert markdown_table({"tiny": r}).splitlines()[0] == "| model | STEM | micro avg | macro avg |"


def test_evaluate_argument_errors():
    items = load_mmlu(FIXTURES, "test")
    with pytest.raises(ValueError, match="needs dev_items"):
        evaluate_mmlu(None, None, items, shots_per_subject=2)
    with pytest.raises(ValueError, match="unknown MMLU mode"):
        evaluate_mmlu(None, None, items, mode="loglik")
    with pytest.raises(ValueError, match="prompt_style 'alpaca'"):
        evaluate_mmlu(None, None, items, shots_per_subject=1, prompt_style="alpaca")


def test_hendrycks_release_format_without_header_and_with_letter_answers(tmp_path):
    """The files as Hendrycks et al. ship them (no header, answers A-D) load as the headed 0-3 form does."""
    import csv

    for split in ("test", "dev"):
        source = FIXTURES / "mmlu" / split
        target = tmp_path / "mmlu" / split
        target.mkdir(parents=True)
        for path in source.glob("*.csv"):
            with open(path, newline="") as f:
                rows = list(csv.reader(f))[1:]
            with open(target / path.name, "w", newline="") as f:
                csv.writer(f).writerows([*row[:5], "ABCD"[int(row[5])]] for row in rows)
    for split in ("test", "dev"):
        assert load_mmlu(tmp_path, split) == load_mmlu(FIXTURES, split)
    bad = tmp_path / "mmlu" / "test" / "anatomy_test.csv"
    bad.write_text("Where is the patella?,Knee,Elbow,Skull,Hip,A\n"
                   "What is the femur?,A bone,A muscle,A nerve,An organ,E\n")
    with pytest.raises(ValueError, match=f"{bad}:2: field 'answer' must be A, B, C or D, got 'E'"):
        load_mmlu(tmp_path, "test")

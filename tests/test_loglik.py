"""Teacher-forced scoring (evaluation/loglik.py; `comlora eval --scoring loglik`) against an independent float64
recomputation on tiny random Llamas, lm-evaluation-harness's token split and acc / acc_norm, and the CLI."""

import copy
import json
import math

import pytest
import torch
from conftest import make_tiny_llama, option_instruction, train_args, write_commonsense_root

from comlora.cli import main
from comlora.data.items import format_prompt, tokenize_item
from comlora.data.options import parse_options
from comlora.evaluation.commonsense import evaluate_commonsense_loglik
from comlora.evaluation.convai2 import evaluate_convai2_loglik
from comlora.evaluation.loglik import continuation_logliks, encode_pair, multiple_choice, shared_prefix, split_pair


def merging_tokenizer():
    """Byte-level BPE over the whole text (no pre-split at spaces or punctuation) with merges that cross the
    context / continuation boundary: ':' + newline, 'r' + 'u', 'x' + 'y' and space + 'o'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [(":", "Ċ"), ("r", "u"), ("x", "y"), ("Ġ", "o")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def reference_loglik(model64, tokenizer, context: str, continuation: str) -> float:
    """lm-evaluation-harness's _encode_pair written out again, then one unpadded float64 forward pass of
    context_enc + continuation_enc and the sum of the continuation tokens' log-probabilities."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_enc = tokenizer(context)["input_ids"]
    continuation_enc = tokenizer(context + continuation)["input_ids"][len(context_enc):]
    return sequence_loglik(model64, context_enc, continuation_enc)


def sequence_loglik(model64, context_ids: list[int], continuation_ids: list[int]) -> float:
    with torch.no_grad():
        logprobs = model64(torch.tensor([context_ids + continuation_ids])).logits[0].double().log_softmax(-1)
    return sum(logprobs[len(context_ids) - 1 + j, t].item() for j, t in enumerate(continuation_ids))


def test_split_pair_moves_the_contexts_trailing_whitespace():
    assert split_pair("### Response:\n", "Sarah") == ("### Response:", "\nSarah")
    assert split_pair("Answer: \n ", " x") == ("Answer:", " \n  x")
    assert split_pair("Answer:", " x") == ("Answer:", " x")


def test_encode_pair_keeps_the_context_tokens_when_the_boundary_merges():
    tok = merging_tokenizer()
    ids = lambda text: tok.convert_tokens_to_ids([{" ": "Ġ", "\n": "Ċ"}.get(c, c) for c in text])  # noqa: E731
    # 'x' + 'y' merge across the boundary: the context keeps its own 'x', the continuation starts after 'xy'
    context_enc, continuation_enc = encode_pair(tok, "ab x", "yz")
    assert context_enc == ids("ab x")
    assert continuation_enc == ids("z")
    # the prompt's newline moves to the option, where it merges with the colon the context ends with
    context_enc, continuation_enc = encode_pair(tok, "### Response:\n", "true")
    assert context_enc == ids("### Response:")
    assert continuation_enc == ids("t") + tok.convert_tokens_to_ids(["ru"]) + ids("e")
    # no merge across the boundary: the continuation is the option's own tokens
    assert encode_pair(tok, "ab\n", "cd") == (ids("ab"), ids("\ncd"))


def test_continuation_logliks_equal_float64_recomputation():
    """Groups mixing 1- to 300-token contexts and 1- to 9-token continuations, batch sizes 1, 3 and 8, also
    groups whose continuations are all one token and contexts that share a header: every sum equals an unpadded
    float64 forward pass."""
    model = make_tiny_llama(seed=4)
    model64 = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()  # noqa: E731
    groups = [(tokens(300), [tokens(1), tokens(9)]), (tokens(1), [tokens(4), tokens(2), tokens(7)]),
              (tokens(57), [tokens(1)]), (tokens(3), [tokens(2), tokens(1)]), (tokens(120), [tokens(5)] * 2),
              (tokens(2), [tokens(1), tokens(1)]), (tokens(200), [tokens(1)])]
    reference = [[sequence_loglik(model64, x, c) for c in cs] for x, cs in groups]
    for batch_size in (1, 3, 8):
        got = continuation_logliks(model, groups, pad_id=0, batch_size=batch_size)
        assert [len(s) for s in got] == [len(cs) for _, cs in groups]
        for sums, ref in zip(got, reference):
            assert sums == pytest.approx(ref, abs=2e-4, rel=1e-5)
    single = [(x, [c[:1] for c in cs]) for x, cs in groups]              # the second pass has nothing to read
    header = tokens(20)                                                  # read once, then copied to every row
    shared = [(header + x, cs) for x, cs in groups[1:]] + [(header[:5], [tokens(3)]), (header[:12], [tokens(2)])]
    assert shared_prefix([x for x, _ in shared]) == header[:4]
    assert shared_prefix([x for x, _ in shared[:-2]]) == header and shared_prefix([header]) == []
    for case in (single, shared):
        got = continuation_logliks(model, case, pad_id=0, batch_size=4)
        assert got == [pytest.approx([sequence_loglik(model64, x, c) for c in cs], abs=2e-4) for x, cs in case]


def test_continuation_logliks_refuse_empty_and_too_long_input():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="group 1 has an empty context or continuation"):
        continuation_logliks(model, [([5], [[6]]), ([5], [[]])], pad_id=0)
    with pytest.raises(ValueError, match="513 tokens exceeds the model's 512 positions"):
        continuation_logliks(model, [([5] * 510, [[6, 7, 8]])], pad_id=0)


def test_multiple_choice_by_hand():
    """acc: the highest summed loglik; acc_norm: per character (lm-evaluation-harness's len(choice)); acc_bytes:
    per UTF-8 byte. 'ééé' is 3 characters and 6 bytes."""
    options, loglik = ["a", "bbbb", "ééé"], [-2.0, -4.0, -4.5]
    # acc: -2.0 > -4.0 > -4.5; per char: -2.0, -1.0, -1.5; per byte: -2.0, -1.0, -0.75
    assert multiple_choice(loglik, options) == {"acc": 0, "acc_norm": 1, "acc_bytes": 2}
    assert multiple_choice([-3.0, -3.0], ["ab", "cd"]) == {"acc": 0, "acc_norm": 0, "acc_bytes": 0}   # ties: first


def commonsense_items():
    """LLM-Adapters items of three tasks whose prompts differ by hundreds of tokens and whose options include
    one-character texts, so a batch mixes very different lengths."""
    specs = {"boolq": [("is it?", []), ("does " + "a very long question " * 9 + "hold?", [])],
             "piqa": [("x" * 3, ["y", "a much longer solution text"]), ("how? " * 40, ["ru", "o o"])],
             "ARC-Easy": [("which?", ["y", "yz", "r", "ééé"]), ("which one " * 20, ["1", "22", "333", "4444"])]}
    evaluation = {}
    for task, rows in specs.items():
        answers = {"boolq": ["true", "false"], "piqa": ["solution1", "solution2"],
                   "ARC-Easy": ["answer1", "answer2", "answer3", "answer4"]}[task]
        evaluation[task] = [{"instruction": option_instruction(task, question, texts), "input": "", "index": i,
                             "answer": answers[i % len(answers)], "output": ""}
                            for i, (question, texts) in enumerate(rows)]
    return evaluation


def test_commonsense_loglik_equals_float64_recomputation_item_by_item():
    tok = merging_tokenizer()
    model = make_tiny_llama(seed=2, vocab=len(tok))
    model64 = copy.deepcopy(model).double()
    evaluation = commonsense_items()
    result = evaluate_commonsense_loglik(model, tok, evaluation, batch_size=3)
    assert result["settings"]["scoring"] == "loglik"
    merged = 0
    for task, items in evaluation.items():
        rows = result["tasks"][task]["items"]
        assert len(rows) == len(items)
        for item, row in zip(items, rows):
            assert row["prompt"] == format_prompt(item)                     # the prompt the text format trains on
            context = row["prompt"].rstrip()
            merged += tok(context + "\n" + row["options"][0])["input_ids"][:len(tok(context)["input_ids"])] \
                != tok(context)["input_ids"]
            assert row["option_loglik"] == pytest.approx(
                [reference_loglik(model64, tok, row["prompt"], option) for option in row["options"]], abs=2e-4)
            assert row["answer_index"] == parse_options(item["instruction"]).labels.index(item["answer"])
            assert row["prediction"] == multiple_choice(row["option_loglik"], row["options"])
        for metric in ("acc", "acc_norm", "acc_bytes"):
            expected = 100 * sum(r["prediction"][metric] == r["answer_index"] for r in rows) / len(rows)
            assert result["tasks"][task][metric] == pytest.approx(expected)
    assert merged == sum(len(items) for items in evaluation.values())    # ':' + newline merge in every item
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert result[metric] == pytest.approx(sum(t[metric] for t in result["tasks"].values()) / 3)
    cloze = evaluate_commonsense_loglik(model, tok, evaluation, batch_size=3, prompt="cloze")
    assert cloze["settings"]["prompt"] == "cloze" and result["settings"]["prompt"] == "options"
    for task, items in evaluation.items():
        for item, row in zip(items, cloze["tasks"][task]["items"]):
            question = parse_options(item["instruction"]).question
            assert row["prompt"] == format_prompt(dict(item, instruction=question))     # no option in the context
            assert row["option_loglik"] == pytest.approx(
                [reference_loglik(model64, tok, row["prompt"], option) for option in row["options"]], abs=2e-4)
    with pytest.raises(ValueError, match="prompt must be one of options, cloze"):
        evaluate_commonsense_loglik(model, tok, evaluation, prompt="letters")
    again = evaluate_commonsense_loglik(model, tok, evaluation, limit=1, batch_size=1)
    assert again["tasks"]["piqa"]["items"][0]["option_loglik"] == \
        pytest.approx(result["tasks"]["piqa"]["items"][0]["option_loglik"], abs=1e-4)


def test_convai2_loglik_is_the_training_loss_on_the_reply():
    """Each turn's NLL equals a float64 recomputation, and NLL / tokens equals the loss training computes on the
    same turn as an item (prompt masked, reply + EOS scored)."""
    from conftest import make_tokenizer

    tok = make_tokenizer()
    model = make_tiny_llama(seed=3, vocab=len(tok))
    model64 = copy.deepcopy(model).double()
    examples = [{"prompt": "Persona:\ni like cats.\n\nConversation:\nPartner: hi" + " there" * k, "response": reply,
                 "dialogue": k, "turn": 0} for k, reply in enumerate(["hello !", "i have two cats , you ?", "ok"])]
    result = evaluate_convai2_loglik(model, tok, examples, batch_size=2)
    for example, item in zip(examples, result["items"]):
        training_item = {"instruction": example["prompt"], "input": "", "output": example["response"]}
        encoded = tokenize_item(tok, training_item, cutoff_len=1024)
        scored = [t for t in encoded["labels"] if t != -100]
        assert item["tokens"] == len(scored) == len(tok(example["response"])["input_ids"]) + 1
        assert item["prompt"] == format_prompt(training_item) and item["response"] == example["response"]
        split = len(encoded["input_ids"]) - len(scored)
        assert item["nll"] == pytest.approx(-sequence_loglik(model64, encoded["input_ids"][:split],
                                                             encoded["input_ids"][split:]), abs=2e-4)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([encoded["input_ids"]]), labels=torch.tensor([encoded["labels"]])).loss
        assert item["nll"] / item["tokens"] == pytest.approx(loss.item(), abs=1e-5)
    total = sum(i["nll"] for i in result["items"]) / sum(i["tokens"] for i in result["items"])
    assert result["metrics"]["nll_per_token"] == pytest.approx(total)
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(total))
    assert result["n"] == 3 and result["settings"]["scoring"] == "loglik"


def write_convai2_file(root, dialogues: int = 20):
    lines = []
    for d in range(dialogues):
        lines += [f"1 your persona: i like topic {d}.", f"2 your persona: i have {d} cats."]
        lines += [f"{n} hi number {n} of {d} ?\tfine , reply {n} about topic {d} ." for n in range(3, 3 + 1 + d % 3)]
    (root / "convai2").mkdir(parents=True, exist_ok=True)
    (root / "convai2" / "valid_self_original_no_cands.txt").write_text("\n".join(lines) + "\n")


def test_cli_loglik_on_a_model_an_adapter_and_a_runs_components(tmp_path, tiny_model_dir, capsys):
    root = write_commonsense_root(tmp_path / "data", with_options=True)
    write_convai2_file(root)
    run, ev = tmp_path / "run", tmp_path / "ev"
    main(train_args(tiny_model_dir, root, run, "--answer-format", "text", "--max-steps", "2", "--cutoff-len", "1024"))
    main(["export", str(run), "--out", str(tmp_path / "winner")])
    common = ["--data-root", str(root), "--eval-size", "4", "--scoring", "loglik", "--device", "cpu"]
    commonsense = ["--tasks", "boolq,piqa,ARC-Easy", "--limit", "3"]
    capsys.readouterr()
    main(["eval", "--run", str(run), "--components", "all", *common, *commonsense])
    winner = json.loads((run / "winner.json").read_text())["winner"]
    table = capsys.readouterr().out
    assert f"| run-component{winner}-winner | acc_norm |" in table and f"| run-component{1 - winner} | acc |" in table
    files = sorted((run / "eval").glob("commonsense-loglik-run-component*-limit3.json"))
    assert [f.name for f in files] == [
        f"commonsense-loglik-run-component{k}{'-winner' if k == winner else ''}-limit3.json" for k in range(2)]
    results = [json.loads(f.read_text()) for f in files]
    assert results[0]["tasks"]["ARC-Easy"]["items"][0]["option_loglik"] != \
        pytest.approx(results[1]["tasks"]["ARC-Easy"]["items"][0]["option_loglik"])      # the components differ
    main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "winner"), *common, *commonsense,
          "--out", str(ev)])
    adapter = json.loads((ev / "commonsense-loglik-winner-limit3.json").read_text())
    assert adapter["settings"]["scoring"] == "loglik" and adapter["settings"]["adapter"] == str(tmp_path / "winner")
    for task, scores in results[winner]["tasks"].items():          # the exported winner scores as the run's winner
        assert [i["option_loglik"] for i in adapter["tasks"][task]["items"]] == \
            [pytest.approx(i["option_loglik"], abs=1e-4) for i in scores["items"]]
    main(["eval", "--model", str(tiny_model_dir), *common, *commonsense, "--out", str(ev)])
    base = json.loads((ev / "commonsense-loglik-base-tiny-llama-limit3.json").read_text())
    assert set(base["tasks"]) == {"boolq", "piqa", "ARC-Easy"} and all(t["n"] == 3 for t in base["tasks"].values())

    for target in (["--run", str(run)], ["--model", str(tiny_model_dir), "--adapter", str(tmp_path / "winner")],
                   ["--model", str(tiny_model_dir)]):
        main(["eval", *target, "--task", "convai2", *common, "--out", str(ev)])
    convai2 = {f.name: json.loads(f.read_text()) for f in ev.glob("convai2-loglik-*.json")}
    assert sorted(convai2) == ["convai2-loglik-base-tiny-llama.json",
                               f"convai2-loglik-run-component{winner}-winner.json", "convai2-loglik-winner.json"]
    run_turns = convai2[f"convai2-loglik-run-component{winner}-winner.json"]
    assert run_turns["n"] == convai2["convai2-loglik-winner.json"]["n"] > 0
    assert [i["nll"] for i in run_turns["items"]] == \
        [pytest.approx(i["nll"], abs=1e-4) for i in convai2["convai2-loglik-winner.json"]["items"]]
    assert run_turns["metrics"]["nll_per_token"] != pytest.approx(
        convai2["convai2-loglik-base-tiny-llama.json"]["metrics"]["nll_per_token"], abs=1e-6)   # trained vs base

    # a generation evaluation beside the loglik ones: `compare` reads the generation one
    main(["eval", "--run", str(run), "--data-root", str(root), "--eval-size", "4", "--limit", "1", "--greedy",
          "--max-new-tokens", "2", "--tasks", "boolq"])
    capsys.readouterr()
    main(["compare", str(run)])
    assert "boolq" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--task", "mmlu"], "--scoring applies to commonsense and convai2"),
    (["--backend", "llama.cpp"], "--scoring loglik runs on the transformers backend"),
])
def test_cli_loglik_refusals(tmp_path, tiny_model_dir, argv, message, capsys):
    root = write_commonsense_root(tmp_path / "data", with_options=True)
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tiny_model_dir), "--data-root", str(root), "--scoring", "loglik", *argv,
              "--out", str(tmp_path / "ev")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()

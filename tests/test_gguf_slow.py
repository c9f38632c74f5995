"""llama.cpp itself runs our GGUF exports of a demo-trained ComLoRA winner and a plain LoRA on SmolLM2 (slow; needs
llama-cpp-python: `make setup-gguf`). The two runs are trained once into $COMLORA_CACHE/test-runs and reused.

The measured figures are printed (pytest -s), kept in $COMLORA_CACHE/test-runs/gguf-figures.json and recorded in
docs/export.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp",
                                reason="needs llama-cpp-python: make setup-gguf (pip install 'comlora[gguf]')")

from comlora.base_models import cache_dir, smollm2_gguf_path  # noqa: E402
from comlora.data.commonsense import build_commonsense_mini  # noqa: E402
from comlora.data.items import data_root, format_prompt  # noqa: E402
from comlora.evaluation.commonsense import evaluate_commonsense  # noqa: E402
from comlora.evaluation.llama_cpp import LlamaCppGenerator, run_generator  # noqa: E402
from comlora.export.gguf import GgufLayout, adapted_weights, write_lora_gguf, write_merged_gguf  # noqa: E402
from comlora.methods.base import LoraWeight  # noqa: E402
from comlora.training.finished_run import reload_method  # noqa: E402

BIN = Path(sys.executable).parent
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
ITEMS_PER_TASK = 25                # the demo's evaluation: 8 tasks x 25 = 200 items, greedy, 16 new tokens
MAX_NEW_TOKENS = 16
THREADS = 2
LOGITS_CTX = 1024                  # logits_all keeps n_ctx x vocab floats: 200 MB here


def trained_run(name: str, config: str) -> Path:
    """A run of ``experiments/<config>`` trained once through the CLI into the cache (resumed if cut short)."""
    run = cache_dir() / "test-runs" / name
    if not (run / "state").is_dir():
        resume = ["--resume"] if (run / "config.yaml").is_file() else []
        subprocess.run([str(BIN / "comlora"), "train", "--config", str(EXPERIMENTS / config), "--device", "cpu",
                        "--out", str(run), *resume], check=True)
    return run


@pytest.fixture(scope="module")
def comlora_run():
    return trained_run("gguf-demo-comlora", "demo-comlora.yaml")


@pytest.fixture(scope="module")
def lora_run():
    return trained_run("gguf-demo-lora", "demo-lora.yaml")


@pytest.fixture(scope="module")
def evaluation():
    return build_commonsense_mini(data_root(), None, eval_size=100, train_per_task=0, val_size=0, seed=0).evaluation


def held_out_texts(evaluation, n: int = 50) -> list[str]:
    """Prompt + gold answer of ``n`` held-out items (items 25.. of each task's reserved evaluation subset)."""
    items = [item for task_items in evaluation.values() for item in task_items[ITEMS_PER_TASK:ITEMS_PER_TASK + 7]]
    return [format_prompt(item) + item["output"] for item in items[:n]]


def record(name: str, values: dict) -> None:
    """Print a measured figure and keep it in the cache's gguf-figures.json (one entry per name)."""
    path = cache_dir() / "test-runs" / "gguf-figures.json"
    figures = json.loads(path.read_text()) if path.is_file() else {}
    figures[name] = values
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n{name}: {json.dumps(values)}")


@torch.no_grad()
def compare_logits(model, tokenizer, llama_adapted: LlamaCppGenerator, llama_base: LlamaCppGenerator, texts):
    """Next-token logits at every position: transformers (base dequantized + adapter) against llama.cpp with the
    adapter, and against llama.cpp without it (a control that the adapter is applied)."""
    same, same_base, positions, gaps, base_gaps, mismatched_tokens = 0, 0, 0, [], [], 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        mismatched_tokens += llama_adapted.tokenize(text) != ids
        ours = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        theirs = llama_adapted.next_token_logits(ids).astype(np.float64)
        base = llama_base.next_token_logits(ids).astype(np.float64)
        same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        same_base += int((ours.argmax(-1) == base.argmax(-1)).sum())
        positions += len(ids)
        gaps.append(np.abs(ours - theirs).mean(-1))
        base_gaps.append(np.abs(ours - base).mean(-1))
    gaps, base_gaps = np.concatenate(gaps), np.concatenate(base_gaps)
    return {"prompts": len(texts), "positions": positions, "tokenization_differs": int(mismatched_tokens),
            "same_argmax": same / positions, "same_argmax_without_adapter": same_base / positions,
            "mean_abs_logit_diff": float(gaps.mean()), "max_mean_abs_logit_diff": float(gaps.max()),
            "mean_abs_logit_diff_without_adapter": float(base_gaps.mean())}


def test_the_demo_run_records_its_q4_1_gguf_base(comlora_run):
    base = json.loads((comlora_run / "winner.json").read_text())["base_model"]
    assert base["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and base["gguf_quantization"] == "Q4_1"
    assert base["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (comlora_run / "adapter" / "README.md").read_text()
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf` (Q4_1 GGUF" in card and base["gguf_sha256"] in card


def test_llama_cpp_logits_with_the_comlora_adapter_match_ours(comlora_run, evaluation, tmp_path):
    method, tokenizer, _ = reload_method(comlora_run, device="cpu")
    winner = method.winner
    adapter = tmp_path / "winner.gguf"
    subprocess.run([str(BIN / "comlora"), "export", str(comlora_run), "--format", "gguf", "--out", str(adapter)],
                   check=True)
    llama_adapted = LlamaCppGenerator(smollm2_gguf_path(), adapter, n_threads=THREADS, n_ctx=LOGITS_CTX,
                                      logits_all=True)
    llama_base = LlamaCppGenerator(smollm2_gguf_path(), n_threads=THREADS, n_ctx=LOGITS_CTX, logits_all=True)
    with method.use_component(winner):
        figures = compare_logits(method, tokenizer, llama_adapted, llama_base, held_out_texts(evaluation))
    record(f"logits, ComLoRA winner (component {winner})", figures)
    # both get the same (transformers') token ids; llama.cpp's own tokenizer splits a few texts differently
    # (runs of spaces before a digit, '½': 4 of the 1600 commonsense-mini prompts, docs/export.md)
    assert figures["prompts"] == 50 and figures["tokenization_differs"] <= 2
    assert figures["same_argmax"] >= 0.95
    assert figures["mean_abs_logit_diff"] < 0.75 * figures["mean_abs_logit_diff_without_adapter"]


def test_llama_cpp_logits_with_a_plain_lora_adapter_match_peft(lora_run, evaluation, tmp_path):
    method, tokenizer, _ = reload_method(lora_run, device="cpu")
    adapter = tmp_path / "lora.gguf"
    subprocess.run([str(BIN / "comlora"), "export", str(lora_run), "--format", "gguf", "--out", str(adapter)],
                   check=True)
    llama_adapted = LlamaCppGenerator(smollm2_gguf_path(), adapter, n_threads=THREADS, n_ctx=LOGITS_CTX,
                                      logits_all=True)
    llama_base = LlamaCppGenerator(smollm2_gguf_path(), n_threads=THREADS, n_ctx=LOGITS_CTX, logits_all=True)
    figures = compare_logits(method.peft_model, tokenizer, llama_adapted, llama_base, held_out_texts(evaluation, 20))
    record("logits, plain LoRA (PEFT)", figures)
    assert figures["same_argmax"] >= 0.95
    assert figures["mean_abs_logit_diff"] < 0.75 * figures["mean_abs_logit_diff_without_adapter"]


@pytest.fixture(scope="module")
def commonsense_answers(comlora_run, evaluation):
    """Commonsense-mini (8 x 25 items, greedy, 16 new tokens) of the winner: transformers (base dequantized +
    winner) and llama.cpp (base GGUF + the winner's GGUF adapter)."""
    method, tokenizer, _ = reload_method(comlora_run, device="cpu")
    torch.set_num_threads(THREADS)
    with method.use_component(method.winner):
        ours = evaluate_commonsense(method, tokenizer, evaluation, ITEMS_PER_TASK, 8, MAX_NEW_TOKENS, 1)
    theirs = evaluate_commonsense(run_generator(method, "smollm2-135m", n_threads=THREADS), None, evaluation,
                                  ITEMS_PER_TASK, 8, MAX_NEW_TOKENS, 1)
    return ours, theirs


def predictions(result) -> list:
    return [row["prediction"] for task in result["tasks"].values() for row in task["items"]]


def test_commonsense_accuracy_through_llama_cpp_matches_ours(commonsense_answers):
    ours, theirs = commonsense_answers
    same = np.mean([a == b for a, b in zip(predictions(ours), predictions(theirs))])
    record("commonsense-mini, winner: transformers vs llama.cpp adapter",
           {"items": len(predictions(ours)), "accuracy_transformers": ours["average"],
            "accuracy_llama_cpp": theirs["average"], "same_prediction": float(same),
            "seconds_transformers": ours["seconds"], "seconds_llama_cpp": theirs["seconds"],
            "per_task": {t: [ours["tasks"][t]["accuracy"], theirs["tasks"][t]["accuracy"]] for t in ours["tasks"]}})
    assert len(predictions(ours)) == 200
    assert abs(ours["average"] - theirs["average"]) <= 2.0


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_merged_gguf_answers_as_base_plus_adapter(comlora_run, evaluation, commonsense_answers, tmp_path, outtype):
    merged = tmp_path / f"merged-{outtype}.gguf"
    subprocess.run([str(BIN / "comlora"), "export", str(comlora_run), "--merge", "--format", "gguf",
                    "--outtype", outtype, "--out", str(merged)], check=True)
    _, with_adapter = commonsense_answers
    result = evaluate_commonsense(LlamaCppGenerator(merged, n_threads=THREADS), None, evaluation, ITEMS_PER_TASK, 8,
                                  MAX_NEW_TOKENS, 1)
    same = np.mean([a == b for a, b in zip(predictions(result), predictions(with_adapter))])
    same_text = np.mean([a["response"] == b["response"] for task in result["tasks"]
                         for a, b in zip(result["tasks"][task]["items"], with_adapter["tasks"][task]["items"])])
    record(f"commonsense-mini, winner: merged GGUF ({outtype}) vs base GGUF + adapter, both llama.cpp",
           {"accuracy_merged": result["average"], "accuracy_adapter": with_adapter["average"],
            "same_prediction": float(same), "same_response_text": float(same_text),
            "file_mb": round(merged.stat().st_size / 2**20, 1)})
    # not the same kernels: base + adapter multiplies by the Q4_1 tensors (llama.cpp quantizes the activations to
    # 8 bits for that), the merged file by f16 / q8_0 ones; the merge itself is exact (the f32 test below), so
    # this is held to (b)'s tolerance for a change of numeric path
    assert same >= 0.95 and abs(result["average"] - with_adapter["average"]) <= 2.0


def test_merged_gguf_equals_base_plus_adapter_at_the_same_precision(comlora_run, evaluation, tmp_path):
    """The merge itself: with every tensor in f32 on both sides (the base dequantized + the adapter at run time,
    against the same with W0 + scale * B A merged), llama.cpp's logits agree. (With the other tensors left in
    Q4_1, llama.cpp's 8-bit quantization of their inputs turns float32 rounding differences into steps of a
    quantization level: 98.5% same argmax, mean |diff| 0.084 measured.)"""
    method, tokenizer, _ = reload_method(comlora_run, device="cpu")
    weights, alpha, _ = adapted_weights(method)
    layout = GgufLayout.from_config(method.model.config)
    unchanged = [LoraWeight(w.module, w.base, w.A, torch.zeros_like(w.B), w.scale) for w in weights]
    write_merged_gguf(smollm2_gguf_path(), tmp_path / "base-f32.gguf", unchanged, layout, outtype="f32",
                      whole_model=True)
    write_merged_gguf(smollm2_gguf_path(), tmp_path / "merged-f32.gguf", weights, layout, outtype="f32",
                      whole_model=True)
    write_lora_gguf(tmp_path / "adapter.gguf", weights, alpha, layout)
    with_adapter = LlamaCppGenerator(tmp_path / "base-f32.gguf", tmp_path / "adapter.gguf", n_threads=THREADS,
                                     n_ctx=LOGITS_CTX, logits_all=True)
    merged = LlamaCppGenerator(tmp_path / "merged-f32.gguf", n_threads=THREADS, n_ctx=LOGITS_CTX, logits_all=True)
    without = LlamaCppGenerator(tmp_path / "base-f32.gguf", n_threads=THREADS, n_ctx=LOGITS_CTX, logits_all=True)
    same, same_without, positions, gaps, gaps_without = 0, 0, 0, [], []
    for text in held_out_texts(evaluation):
        ids = tokenizer(text)["input_ids"]
        a, m, b = (g.next_token_logits(ids).astype(np.float64) for g in (with_adapter, merged, without))
        same += int((a.argmax(-1) == m.argmax(-1)).sum())
        same_without += int((b.argmax(-1) == m.argmax(-1)).sum())
        positions += len(ids)
        gaps.append(np.abs(a - m).mean(-1))
        gaps_without.append(np.abs(b - m).mean(-1))
    figures = {"positions": positions, "same_argmax": same / positions,
               "mean_abs_logit_diff": float(np.concatenate(gaps).mean()),
               "same_argmax_without_adapter": same_without / positions,
               "mean_abs_logit_diff_without_adapter": float(np.concatenate(gaps_without).mean())}
    record("logits, merged GGUF (all f32) vs the same base in f32 + adapter, both llama.cpp", figures)
    assert figures["same_argmax"] >= 0.99
    assert figures["mean_abs_logit_diff"] < 0.02 * figures["mean_abs_logit_diff_without_adapter"]


def test_eval_backend_llama_cpp_runs_every_generation_task(comlora_run, tmp_path):
    out = tmp_path / "ev"
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    common = ["--backend", "llama.cpp", "--greedy", "--limit", "2", "--max-new-tokens", "8", "--out", str(out)]
    subprocess.run([str(BIN / "comlora"), "eval", "--run", str(comlora_run), "--tasks", "boolq", *common],
                   check=True, env=env)
    subprocess.run([str(BIN / "comlora"), "eval", "--run", str(comlora_run), "--task", "mmlu",
                    "--mmlu-mode", "generate", "--subjects", "astronomy", *common], check=True, env=env)
    subprocess.run([str(BIN / "comlora"), "eval", "--task", "convai2", "--no-bertscore", *common], check=True, env=env)
    results = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert len(results) == 3 and all(r["settings"]["backend"] == "llama.cpp" for r in results.values())
    commonsense = next(r for n, r in results.items() if n.startswith("commonsense-"))
    assert (commonsense["tasks"]["boolq"]["n"] == 2
            and "winner-llama.cpp" in next(n for n in results if "commonsense" in n))
    assert next(r for n, r in results.items() if n.startswith("mmlu-"))["n"] == 2
    assert next(r for n, r in results.items() if n.startswith("convai2-"))["n"] == 2

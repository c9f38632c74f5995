"""`comlora eval` speed, transformers against llama.cpp (`--backend llama.cpp`), side by side in one process.

    python bench/llama_cpp_speed.py [--run RUN] [--items-per-task 5] [--rounds 3]

All evaluate the same ComLoRA winner on the same commonsense-mini items (greedy, 16 new tokens, 2 threads):
transformers with the base dequantized + the component (what `comlora eval --run RUN` runs, batch 8);
llama.cpp with the base GGUF + the component as a GGUF LoRA adapter (what `comlora eval --backend llama.cpp`
runs, one prompt at a time); and llama.cpp on the merged GGUF model (`comlora export --merge --format gguf`,
f16 and q8_0: what an Ollama user runs). The backends take turns, their order rotating each round, so machine
noise hits all alike; the ratios of the medians are printed and written to bench/results/ and
docs/performance.md (between its `<!-- bench:llama.cpp -->` markers).
RUN defaults to the demo-trained run the slow GGUF tests keep in $COMLORA_CACHE/test-runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from comlora.base_models import cache_dir
from comlora.data.commonsense import build_commonsense_mini
from comlora.data.items import data_root
from comlora.evaluation.commonsense import evaluate_commonsense
from comlora.evaluation.llama_cpp import LlamaCppGenerator, run_generator
from comlora.export.gguf import GgufLayout, adapted_weights, write_merged_gguf
from comlora.provenance import base_gguf_file
from comlora.training.finished_run import reload_method

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
MAX_NEW_TOKENS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(cache_dir() / "test-runs" / "gguf-demo-comlora"), help="A ComLoRA run.")
    parser.add_argument("--items-per-task", type=int, default=5, help="Evaluation items per task (8 tasks).")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Rounds; each backend evaluates every item once per round.")
    parser.add_argument("--no-doc", action="store_true", help="Do not update docs/performance.md.")
    args = parser.parse_args()

    torch.set_num_threads(THREADS)
    method, tokenizer, cfg = reload_method(args.run, device="cpu")
    evaluation = build_commonsense_mini(data_root(), None, eval_size=100, train_per_task=0, val_size=0,
                                        seed=cfg.split_seed).evaluation
    generators = {"llama.cpp": run_generator(method, cfg.model, n_threads=THREADS)}
    folder = tempfile.TemporaryDirectory(prefix="comlora-speed-")
    weights, _, _ = adapted_weights(method)
    for outtype in ("f16", "q8_0"):
        merged = Path(folder.name) / f"merged-{outtype}.gguf"
        write_merged_gguf(base_gguf_file(cfg.model), merged, weights, GgufLayout.from_config(method.model.config),
                          outtype=outtype)
        generators[f"llama.cpp merged {outtype}"] = LlamaCppGenerator(merged, n_threads=THREADS)
    items = args.items_per_task * len(evaluation)

    def transformers_eval():
        with method.use_component(method.winner):
            return evaluate_commonsense(method, tokenizer, evaluation, args.items_per_task, 8, MAX_NEW_TOKENS, 1)

    backends = [("transformers", transformers_eval)] + [
        (name, lambda g=g: evaluate_commonsense(g, None, evaluation, args.items_per_task, 8, MAX_NEW_TOKENS, 1))
        for name, g in generators.items()]
    seconds = {name: [] for name, _ in backends}
    results = {}
    for round_index in range(args.rounds):
        shift = round_index % len(backends)
        for name, evaluate in backends[shift:] + backends[:shift]:
            started = time.perf_counter()
            results[name] = evaluate()
            seconds[name].append(time.perf_counter() - started)
            print(f"round {round_index + 1} {name}: {seconds[name][-1]:.1f} s", file=sys.stderr)
    for g in generators.values():
        g.close()
    folder.cleanup()

    predictions = {name: [row["prediction"] for task in r["tasks"].values() for row in task["items"]]
                   for name, r in results.items()}
    median = {name: statistics.median(s) for name, s in seconds.items()}
    command = (f"python bench/llama_cpp_speed.py --items-per-task {args.items_per_task} --rounds {args.rounds}"
               + (f" --run {args.run}" if args.run != parser.get_default("run") else ""))
    record = {"command": command, "run": args.run, "items": items, "max_new_tokens": MAX_NEW_TOKENS, "threads": THREADS,
              "seconds": seconds, "median_seconds": median,
              "items_per_second": {n: items / s for n, s in median.items()},
              "speed_vs_transformers": {n: median["transformers"] / median[n] for n in median},
              "accuracy": {n: r["average"] for n, r in results.items()},
              "same_prediction_as_transformers": {
                  n: statistics.mean(a == b for a, b in zip(predictions["transformers"], p))
                  for n, p in predictions.items()},
              "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__}}
    report = "\n".join([
        f"Command: `{command}` ({items} commonsense-mini items of the demo-trained ComLoRA winner, greedy, "
        f"{MAX_NEW_TOKENS} new tokens, {THREADS} threads, {args.rounds} rounds in rotating order; median seconds).", "",
        "| backend | seconds (median) | items/s | speed vs transformers | accuracy | same prediction as transformers |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {median[n]:.1f} | {items / median[n]:.2f} | {record['speed_vs_transformers'][n]:.2f}x | "
          f"{results[n]['average']:.1f} | {100 * record['same_prediction_as_transformers'][n]:.1f}% |"
          for n in seconds]])
    print(report)
    out = ROOT / "bench" / "results" / f"llama-cpp-speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    if not args.no_doc:
        doc = ROOT / "docs" / "performance.md"
        text = doc.read_text()
        start, end = "<!-- bench:llama.cpp -->", "<!-- /bench:llama.cpp -->"
        block = f"{start}\n{report}\n\nRecorded: `bench/results/{out.name}`.\n{end}"
        if start in text:
            text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip() + "\n\n## Evaluation through llama.cpp\n" + block + "\n"
        doc.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()

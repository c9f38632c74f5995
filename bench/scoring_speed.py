"""`comlora eval` on commonsense, generation against log-likelihood scoring (`--scoring loglik`), side by side.

    python bench/scoring_speed.py [--items-per-task 100] [--rounds 1] [--protocols greedy16,loglik]
                                  [--model smollm2-135m | --run RUN] [--threads 2] [--batch-size 8]

Every protocol evaluates the same model on the same commonsense-mini evaluation items (data seed 0, 100 per task:
the 800 items of Study I), in one process, taking turns with their order rotating each round so that machine
noise hits all alike:

- greedy16: generation as Study I evaluated (`comlora study`: --greedy --max-new-tokens 16 --batch-size 8);
- beam4: generation with `comlora eval`'s defaults (4 beams, 32 new tokens; LLM-Adapters' protocol);
- loglik: `--scoring loglik` (each option's text scored after the prompt; --batch-size prompts per pass).

Prints the median seconds, items per second and each generation protocol's time over loglik's, and writes them
to bench/results/scoring-speed-<time>.json. The model is the base (--model) or a run's winner / LoRA (--run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from comlora.base_models import load_model_and_tokenizer
from comlora.data.commonsense import build_commonsense_mini
from comlora.data.items import data_root
from comlora.evaluation.commonsense import evaluate_commonsense, evaluate_commonsense_loglik

ROOT = Path(__file__).resolve().parents[1]
GENERATION = {"greedy16": {"max_new_tokens": 16, "num_beams": 1}, "beam4": {"max_new_tokens": 32, "num_beams": 4}}


def load(args):
    """(model, tokenizer, a context that selects the run's winner, label)."""
    if args.run is None:
        model, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
        return model.eval(), tokenizer, contextlib.nullcontext, f"base {args.model}"
    from comlora.methods.comlora.model import ComLoraModel
    from comlora.training.finished_run import reload_method

    method, tokenizer, _ = reload_method(args.run, device="cpu")
    if isinstance(method, ComLoraModel):
        return method, tokenizer, lambda: method.use_component(method.winner), f"{args.run} (winner)"
    return method, tokenizer, contextlib.nullcontext, args.run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="Base model to evaluate (ignored with --run).")
    parser.add_argument("--run", help="A run directory: evaluate its winner (ComLoRA) or its adapter.")
    parser.add_argument("--items-per-task", type=int, default=100, help="Evaluation items per task (8 tasks).")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Rounds; each protocol evaluates every item once per round.")
    parser.add_argument("--protocols", default="greedy16,loglik", help="Comma-separated: greedy16, beam4, loglik.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call / per loglik pass.")
    args = parser.parse_args()
    protocols = args.protocols.split(",")
    unknown = sorted(set(protocols) - set(GENERATION) - {"loglik"})
    if unknown or "loglik" not in protocols or len(protocols) < 2:
        parser.error(f"--protocols: loglik and at least one of {', '.join(GENERATION)} (unknown: {unknown})")

    torch.set_num_threads(args.threads)
    model, tokenizer, winner, label = load(args)
    evaluation = build_commonsense_mini(data_root(), None, eval_size=100, train_per_task=0, val_size=0,
                                        seed=0).evaluation
    items = sum(len(v[:args.items_per_task]) for v in evaluation.values())

    def evaluate(protocol: str) -> dict:
        with winner():
            if protocol == "loglik":
                return evaluate_commonsense_loglik(model, tokenizer, evaluation, args.items_per_task, args.batch_size)
            return evaluate_commonsense(model, tokenizer, evaluation, args.items_per_task, args.batch_size,
                                        **GENERATION[protocol])

    seconds = {p: [] for p in protocols}
    results = {}
    for round_index in range(args.rounds):
        shift = round_index % len(protocols)
        for protocol in protocols[shift:] + protocols[:shift]:
            started = time.perf_counter()
            results[protocol] = evaluate(protocol)
            seconds[protocol].append(time.perf_counter() - started)
            print(f"round {round_index + 1} {protocol}: {seconds[protocol][-1]:.1f} s", file=sys.stderr)

    median = {p: statistics.median(s) for p, s in seconds.items()}
    score = {p: (f"acc {r['acc']:.1f}, acc_norm {r['acc_norm']:.1f}" if p == "loglik"
                 else f"accuracy {r['average']:.1f}")
             for p, r in results.items()}
    command = " ".join(["python bench/scoring_speed.py", *sys.argv[1:]])
    record = {"command": command, "model": label, "items": items, "rounds": args.rounds, "threads": args.threads,
              "batch_size": args.batch_size, "seconds": seconds, "median_seconds": median,
              "items_per_second": {p: items / s for p, s in median.items()},
              "slower_than_loglik": {p: median[p] / median["loglik"] for p in median if p != "loglik"},
              "scores": score, "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                                            "torch": torch.__version__}}
    print("\n".join([
        f"Command: `{command}` ({items} commonsense-mini evaluation items of {label}, {args.threads} threads, "
        f"batch {args.batch_size}, {args.rounds} round(s); median seconds).", "",
        "| protocol | seconds | items/s | time / loglik's | scores |", "|---|---|---|---|---|",
        *[f"| {p} | {median[p]:.1f} | {items / median[p]:.2f} | {median[p] / median['loglik']:.2f}x | {score[p]} |"
          for p in protocols]]))
    out = ROOT / "bench" / "results" / f"scoring-speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()

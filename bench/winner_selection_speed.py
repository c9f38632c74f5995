"""Winner selection before and after issue 25 (item 6), side by side on the same model, items and batches.

Before: what ``ComLoraModel.select_winner`` ran until then, per validation batch as the training loop builds them
(``validation_batches``: the items in order, ``batch_size`` each): the selector's sim and one K-copy forward for the
losses. After: ``select_winner`` now (the rows regrouped longest first into batches of at most as many positions
as the largest given batch). Both see the same ComLoRA model (random B, so the components differ); the script checks
that they agree (same winner, similarities and losses to float rounding) and prints the times and their ratio:
wall time and the process's CPU time (all threads), which moves less when other jobs share the CPU.

    python bench/winner_selection_speed.py --val-size 40 --components 2 --rounds 3 [--load-in-4bit]
"""

import argparse
import os
import platform
import statistics
import time

import torch

from comlora.base_models import load_model_and_tokenizer
from comlora.methods.base import seeded
from comlora.methods.registry import build_method
from comlora.training.batches import validation_batches
from comlora.training.config import TrainConfig
from comlora.training.data import load_training_data


@torch.no_grad()
def select_per_batch(cm, batches) -> tuple[list[float], list[float]]:
    """The per-batch computation select_winner ran before: (similarity sums, mean validation loss per component)."""
    cm.eval()
    k = cm.config.num_components
    sim_sum, loss_sum, loss_samples = torch.zeros(k), torch.zeros(k), 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        sim_sum += cm.similarity(ids, mask).float().sum(0)
        losses, counts = cm.component_losses(ids, mask, batch["labels"])
        loss_sum += losses[counts > 0].float().sum(0)
        loss_samples += int((counts > 0).sum())
    return sim_sum.tolist(), (loss_sum / loss_samples).tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--val-size", type=int, default=40)
    parser.add_argument("--components", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="the training loop's default micro-batch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved before/after rounds")
    parser.add_argument("--load-in-4bit", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = TrainConfig(model=args.model, val_size=args.val_size, num_components=args.components,
                      batch_size=args.batch_size, device="cpu", dtype="float32", load_in_4bit=args.load_in_4bit)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device="cpu", dtype="float32",
                                                load_in_4bit=args.load_in_4bit)
    _, val_examples = load_training_data(cfg, tokenizer)
    cm = build_method(cfg, model)
    with seeded(1), torch.no_grad():
        for layer in cm.adapted.values():
            layer.lora_B.normal_(std=0.02)
    batches = list(validation_batches(val_examples, cfg.batch_size, tokenizer.pad_token_id, torch.device("cpu")))
    lengths = [len(e["input_ids"]) for e in val_examples]
    padded = sum(b["input_ids"].numel() for b in batches)
    print(f"model {args.model}{' (4-bit nf4)' if args.load_in_4bit else ' (float32)'}, K={args.components}, "
          f"{len(val_examples)} validation items, {len(batches)} batches of {cfg.batch_size}; token lengths "
          f"{min(lengths)}..{max(lengths)} (mean {statistics.mean(lengths):.0f}); positions per copy: "
          f"{padded} padded as given, {sum(lengths)} without padding")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average before: {os.getloadavg()[0]:.1f}")

    wall, cpu, results = {"before": [], "after": []}, {"before": [], "after": []}, {}
    run = {"before": lambda: select_per_batch(cm, batches), "after": lambda: cm.select_winner(batches)}
    for r in range(args.rounds):
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):      # alternating order
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = run[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        print(f"round {r + 1}: before {wall['before'][-1]:.1f} s ({cpu['before'][-1]:.1f} s CPU), after "
              f"{wall['after'][-1]:.1f} s ({cpu['after'][-1]:.1f} s CPU) (load average {os.getloadavg()[0]:.1f})")
    (old_sim, old_loss), report = results["before"], results["after"]

    sim_err = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(old_sim, report.similarity))
    loss_err = max(abs(a - b) / abs(a) for a, b in zip(old_loss, report.val_loss))
    old_winner = max(range(args.components), key=lambda k: old_sim[k])
    print(f"before: similarity {[f'{s:.6f}' for s in old_sim]}, val loss {[f'{v:.6f}' for v in old_loss]}, "
          f"winner {old_winner}")
    print(f"after:  similarity {[f'{s:.6f}' for s in report.similarity]}, "
          f"val loss {[f'{v:.6f}' for v in report.val_loss]}, winner {report.winner}")
    print(f"agreement: same winner {old_winner == report.winner}, largest relative difference: similarity "
          f"{sim_err:.1e}, val loss {loss_err:.1e}")
    for label, times in (("wall", wall), ("CPU (all threads)", cpu)):
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        print(f"median {label} time over {args.rounds} rounds: before {before:.1f} s, after {after:.1f} s, "
              f"speed-up {before / after:.2f}x")


if __name__ == "__main__":
    main()

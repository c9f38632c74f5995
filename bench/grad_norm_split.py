"""Which parameters make ComLoRA's gradient norm: the first optimizer steps of a study experiment (its config, data
and batches, as `comlora train` runs them), with the norm before clipping split into the selector's and the
components' parameters, ||g||^2 = ||g_selector||^2 + ||g_components||^2, and each one's share after clipping.

    python bench/grad_norm_split.py --experiment t3-comlora-k2-r8 --steps 6
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import get_scheduler

from comlora.base_models import load_model_and_tokenizer
from comlora.data.items import collate
from comlora.methods.registry import build_method
from comlora.study.runner import load_experiments, train_config
from comlora.training.batches import micro_batches
from comlora.training.data import load_training_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", default="experiments/study")
    parser.add_argument("--experiment", default="t3-comlora-k2-r8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    base, experiments = load_experiments(args.study)
    exp = next((e for e in experiments if e.name == args.experiment), None)
    if exp is None or not exp.train:
        sys.exit(f"{args.study}: no trained experiment named {args.experiment!r}")
    cfg = train_config(base, exp, args.seed, "/nonexistent")          # nothing is written
    torch.manual_seed(cfg.seed)                                        # as the training loop
    model, tokenizer = load_model_and_tokenizer(cfg.model, device="cpu", dtype=cfg.dtype)
    examples, _ = load_training_data(cfg, tokenizer)
    method = build_method(cfg, model)
    named = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    groups = {"selector": [p for n, p in named if "selector" in n], "components": [p for n, p in named if "selector" not in n]}
    if not groups["selector"]:
        sys.exit(f"{args.experiment}: trains no selector ({exp.label}); pick a ComLoRA experiment with one")
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.max_steps or cfg.epochs * (len(examples) // (cfg.batch_size * cfg.grad_accum))   # as the loop
    if args.steps > min(total, len(examples) // (cfg.batch_size * cfg.grad_accum)):
        sys.exit(f"--steps {args.steps}: the run has {total} steps, and this script covers the first epoch only")
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    batches = micro_batches([len(e["input_ids"]) for e in examples], cfg.batch_size, 1, 0, cfg.seed, 0, cfg.group_by_length)
    print(f"python bench/grad_norm_split.py --experiment {args.experiment} --seed {args.seed} --steps {args.steps}")
    print(f"{exp.label}: {sum(p.numel() for p in groups['selector'])} selector and "
          f"{sum(p.numel() for p in groups['components'])} component parameters; max_grad_norm {cfg.max_grad_norm}")
    print("step  loss     |g|      |g_selector|  |g_components|  components' norm after clipping")
    method.train()
    for step in range(1, args.steps + 1):
        loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = collate([examples[i] for i in next(batches)], tokenizer.pad_token_id)
            micro_loss, _ = method.training_loss(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 step - 1, total)
            (micro_loss / cfg.grad_accum).backward()
            loss += micro_loss.item() / cfg.grad_accum
        norms = {g: sum(float(p.grad.double().pow(2).sum()) for p in ps if p.grad is not None) ** 0.5
                 for g, ps in groups.items()}
        norm = (norms["selector"] ** 2 + norms["components"] ** 2) ** 0.5
        if cfg.max_grad_norm > 0:                      # as the loop: 0 = no clipping
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        clipped = norms["components"] * (min(1.0, cfg.max_grad_norm / norm) if cfg.max_grad_norm > 0 else 1.0)
        print(f"{step:4d}  {loss:7.3f}  {norm:7.2f}  {norms['selector']:12.3f}  {norms['components']:14.4f}  "
              f"{clipped:.5f}", flush=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()

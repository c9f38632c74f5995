"""Which parameters make ComLoRA's gradient norm: the first optimizer steps of a study experiment (its config, data
and batches, as `comlora train` runs them), with the norm before clipping split into the selector's and the
components' parameters, ||g||^2 = ||g_selector||^2 + ||g_components||^2, and the components' norm after clipping
(the experiment's clip_grad, joint for Study I; --clip-grad to try the other).

    python bench/grad_norm_split.py --experiment t3-comlora-k2-r8 --steps 6 [--clip-grad per_group]
"""

import argparse
import sys

import torch
from transformers import get_scheduler

from comlora.base_models import load_model_and_tokenizer
from comlora.data.items import collate
from comlora.methods.registry import build_method
from comlora.study.experiments import load_experiments, train_config
from comlora.training.batches import micro_batches
from comlora.training.clipping import clip_gradients, gradient_groups, gradient_norm
from comlora.training.config import CLIP_GRAD
from comlora.training.data import load_training_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", default="experiments/study")
    parser.add_argument("--experiment", default="t3-comlora-k2-r8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--clip-grad", choices=CLIP_GRAD, help="Clip this way instead of as the experiment says.")
    args = parser.parse_args()
    base, experiments = load_experiments(args.study)
    exp = next((e for e in experiments if e.name == args.experiment), None)
    if exp is None or not exp.train:
        sys.exit(f"{args.study}: no trained experiment named {args.experiment!r}")
    cfg = train_config(base, exp, args.seed, "/nonexistent")          # nothing is written
    clip_grad = args.clip_grad or cfg.clip_grad
    torch.manual_seed(cfg.seed)                                        # as the training loop
    model, tokenizer = load_model_and_tokenizer(cfg.model, device="cpu", dtype=cfg.dtype)
    examples, _ = load_training_data(cfg, tokenizer)
    method = build_method(cfg, model)
    params = [p for p in method.parameters() if p.requires_grad]
    groups = gradient_groups(method, params)         # adapter = the components, router = the selector
    if getattr(method, "selector", None) is None:
        sys.exit(f"{args.experiment}: trains no selector ({exp.label}); pick a ComLoRA experiment with one")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.max_steps or cfg.epochs * (len(examples) // (cfg.batch_size * cfg.grad_accum))   # as the loop
    if args.steps > min(total, len(examples) // (cfg.batch_size * cfg.grad_accum)):
        sys.exit(f"--steps {args.steps}: the run has {total} steps, and this script covers the first epoch only")
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    batches = micro_batches([len(e["input_ids"]) for e in examples], cfg.batch_size, 1, 0, cfg.seed, 0,
                            cfg.group_by_length)
    print(f"python bench/grad_norm_split.py --experiment {args.experiment} --seed {args.seed} --steps {args.steps}"
          + (f" --clip-grad {args.clip_grad}" if args.clip_grad else ""))
    print(f"{exp.label}: {sum(p.numel() for p in groups['router'])} selector and "
          f"{sum(p.numel() for p in groups['adapter'])} component parameters; max_grad_norm {cfg.max_grad_norm}, "
          f"clip_grad {clip_grad}")
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
        norms = clip_gradients(params, groups, cfg.max_grad_norm, clip_grad)      # as the loop
        clipped = float(gradient_norm(groups["adapter"]))
        print(f"{step:4d}  {loss:7.3f}  {norms['grad_norm']:7.2f}  {norms['grad_norm_router']:12.3f}  "
              f"{norms['grad_norm_adapter']:14.4f}  {clipped:.5f}", flush=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()

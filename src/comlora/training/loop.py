"""The training loop: plain AdamW steps over micro-batches, with Accelerate for devices and processes.

Run directory (``cfg.out``):
  config.yaml         the resolved TrainConfig
  metrics.jsonl       one line per optimizer step (loss parts, eta, per-component loss, gradient norms before
                      clipping, whole and per parameter group, lr, tokens/s, memory)
  checkpoints/step-N  trainable tensors, optimizer, scheduler, RNG, position (written atomically, fsynced);
                      a sharded run's: Accelerate's save_state (checkpoints.save_sharded_checkpoint)
  state/              the final method state (ComLoRA: every component + selector; LoRA: the PEFT adapter)
  winner.json         ComLoRA winner selection on the validation set; validation.json for other methods
  adapter/            the winner (or the LoRA) as a standard PEFT adapter, when the method is mergeable
  *.png               Figure 2 (per-component loss curves) and Figure 3 (lowest-loss share)
  complete.json       written last: the run is complete (safe_run_dir.py: the lock, atomic folders, the marker)
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object
from torch import nn
from tqdm.auto import tqdm

import comlora.peft_import  # noqa: F401  (before transformers' get_scheduler, which imports peft: peft_import.py)

# isort: split
from transformers import get_scheduler

from comlora.base_models import load_model_and_tokenizer, resolve_device
from comlora.cpu_memory import peak_rss_mb, retain_freed_memory
from comlora.data.items import collate
from comlora.methods.registry import build_method, method_config
from comlora.provenance import base_model_record
from comlora.quantization import quantization_record
from comlora.storage import json_line, write_json, write_text
from comlora.training.batches import micro_batches, validation_batches
from comlora.training.clipping import clip_with_accelerator, gradient_groups
from comlora.training.config import TrainConfig
from comlora.training.data import load_training_data, training_items
from comlora.training.distributed import (
    full_trainable_state,
    is_sharded,
    refuse_unsupported_sharded_options,
    unsharded_method,
    use_fsdp_on_cpu,
    with_launcher_mixed_precision,
)
from comlora.training.processes import on_main_process
from comlora.training.run_checkpoints import (
    resume_from_checkpoint,
    resume_from_sharded_checkpoint,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from comlora.training.safe_run_dir import (
    CHECKPOINTS,
    RunError,
    check_run_dir,
    checkpoint_dirs,
    final_save,
    open_run_dir,
)
from comlora.training.tracking import TRACKER_PROJECT, tracker_config, tracker_logging_dir, tracker_values


class TrainingDiverged(RunError):
    """The loss or the gradient norm stayed non-finite for ``max_nonfinite_steps`` consecutive steps."""


class TrainingObjective(nn.Module):
    """What Accelerate wraps (DDP across processes): forward = the method's training loss."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: dict, step: int, total_steps: int):
        return self.method.training_loss(batch["input_ids"], batch["attention_mask"], batch["labels"], step,
                                         total_steps)


def train(cfg: TrainConfig, resume: bool = False, accelerator: Accelerator | None = None,
          stop_after: int | None = None) -> Path:
    """Train ``cfg.method`` as configured; returns the run directory. ``stop_after`` ends the loop early
    after that many optimizer steps (as a kill would), leaving the run resumable."""
    cfg = with_launcher_mixed_precision(cfg)
    if cfg.mixed_precision == "fp16" and resolve_device(cfg.device).type != "cuda":
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU (its loss scaling is for CUDA); on this device use "
                         "--mixed-precision bf16 or no")
    with ExitStack() as run_lock:       # the run directory's lock (run_dir.RunLock), held until training ends
        return _train(cfg, resume, accelerator, stop_after, run_lock)


def _train(cfg: TrainConfig, resume: bool, accelerator: Accelerator | None, stop_after: int | None,
           run_lock: ExitStack) -> Path:
    accelerator = accelerator or Accelerator(     # cpu=True for `auto` on a CPU too, else each process runs alone
        cpu=resolve_device(cfg.device).type == "cpu", mixed_precision=cfg.mixed_precision, log_with=cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.out, logging_dir=tracker_logging_dir(cfg.out)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    use_fsdp_on_cpu(accelerator)
    refuse_unsupported_sharded_options(accelerator, cfg)
    main = accelerator.is_main_process
    method_config(cfg).check_processes(accelerator.num_processes)
    on_main_process(accelerator, check_run_dir, cfg, resume)      # reads only: --out is written once every check passed
    run = Path(cfg.out)
    if cfg.retain_cpu_memory and accelerator.device.type == "cpu":
        retain_freed_memory()

    torch.manual_seed(cfg.seed)
    items = training_items(cfg)           # a missing or bad --data fails here, before the model is loaded
    model, tokenizer = load_model_and_tokenizer(cfg.model, device=str(accelerator.device), dtype=cfg.dtype,
                                                load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit)
    train_examples, val_examples = load_training_data(cfg, tokenizer, items)
    method = build_method(cfg, model).to(model.device)
    if cfg.gradient_checkpointing:
        method.gradient_checkpointing_enable()
    if main and hasattr(method, "print_trainable_parameters"):
        method.print_trainable_parameters()

    per_step = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    steps_per_epoch = len(train_examples) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_examples)} training items are fewer than one optimizer step needs "
                         f"(batch_size {cfg.batch_size} x {accelerator.num_processes} processes "
                         f"x grad_accum {cfg.grad_accum})")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    # together: FSDP2 and DeepSpeed swap the parameters the optimizer holds, fp16 loss scaling steps through it
    objective, optimizer = accelerator.prepare(TrainingObjective(method), optimizer)
    if is_sharded(accelerator):     # its checkpoints are accelerator.save_state: the scheduler goes in them too
        accelerator.register_for_checkpointing(scheduler)
    params = [p for p in objective.parameters() if p.requires_grad]
    groups = gradient_groups(method, params)        # what clip_grad per_group clips one by one
    # every check passed: lock --out, write config.yaml
    lock = on_main_process(accelerator, open_run_dir, cfg, resume)
    if lock is not None:
        run_lock.enter_context(lock)
    if cfg.report_to:
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(cfg.to_dict()))

    if not resume:
        step = 0
    elif is_sharded(accelerator):
        step = resume_from_sharded_checkpoint(accelerator, run, method)
    else:
        step = resume_from_checkpoint(run, method, optimizer, scheduler, accelerator.process_index)
    start_step, nonfinite_steps = step, 0
    metrics_file = run / "metrics.jsonl"
    if main:   # keep only the lines of steps the restored state has seen
        lines = metrics_file.read_text().splitlines() if resume and metrics_file.exists() else []
        write_text(metrics_file, "".join(l + "\n" for l in lines if (seen := _step_of(l)) is not None and seen <= step))

    def checkpoint(at_step: int) -> None:   # every process hands in its random state, the main one writes (sharded:
        if is_sharded(accelerator):         # Accelerate's save_state, every process writes its part)
            save_sharded_checkpoint(accelerator, run, method, at_step, cfg.keep_checkpoints)
            return
        on_main_process(accelerator, save_checkpoint, run, method, optimizer, scheduler, at_step, cfg.keep_checkpoints,
                        gather_object([rng_state()]))

    lengths = [len(e["input_ids"]) for e in train_examples]
    progress = tqdm(total=total_steps, initial=step, disable=not main, desc=f"train {cfg.method}", dynamic_ncols=True)
    run_lock.callback(progress.close)       # an error message then starts on a line of its own
    batches = (b for epoch in range(sys.maxsize)
               for b in micro_batches(lengths, cfg.batch_size, accelerator.num_processes,
                                      accelerator.process_index, cfg.seed, epoch, cfg.group_by_length))
    for _ in range(step * cfg.grad_accum):       # the data position of a resumed run
        next(batches)
    objective.train()
    end = total_steps if stop_after is None else min(total_steps, step + stop_after)
    while step < end:
        method.on_optimizer_step(step, total_steps, optimizer, lambda: list(validation_batches(
            val_examples, cfg.batch_size, tokenizer.pad_token_id, accelerator.device)), run if main else None)
        started = time.perf_counter()
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in
                     collate([train_examples[i] for i in next(batches)], tokenizer.pad_token_id).items()}
            tokens += int(batch["attention_mask"].sum())
            sync = micro == cfg.grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(objective):
                with accelerator.autocast():            # the forward pass only: backward runs outside autocast
                    loss, parts = objective(batch, step, total_steps)
                accelerator.backward(loss / cfg.grad_accum)
            for key, value in parts.items():
                if isinstance(value, list):
                    sums[key] = [a + b / cfg.grad_accum for a, b in zip(sums.get(key, [0.0] * len(value)), value)]
                else:
                    sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
        means = _mean_over_processes(accelerator, sums)
        norms = clip_with_accelerator(accelerator, params, groups, cfg.max_grad_norm, cfg.clip_grad)
        grad_norm = norms["grad_norm"]
        # fp16: the GradScaler skips a step whose gradients overflowed and lowers its scale; that is no divergence
        finite = math.isfinite(means["loss"]) and (math.isfinite(grad_norm) or cfg.mixed_precision == "fp16")
        if finite:                      # a non-finite step updates no weight
            optimizer.step()
        nonfinite_steps = 0 if finite else nonfinite_steps + 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - started
        record = {"step": step, **means, **norms, "lr": scheduler.get_last_lr()[0],
                  "tokens_per_s": tokens * accelerator.num_processes / seconds, "step_seconds": seconds,
                  "peak_rss_mb": peak_rss_mb()}
        if not finite:
            record["skipped"] = True
        if "component_loss" in record:
            record["lowest_loss_component"] = min(range(len(record["component_loss"])),
                                                  key=record["component_loss"].__getitem__)
        if cfg.report_to:
            accelerator.log(tracker_values(record), step=step)
        if main:
            with metrics_file.open("a") as f:
                f.write(json_line(record) + "\n")
            progress.update(1)
            progress.set_postfix({k: f"{v:.3f}" for k, v in method.progress_metrics(record).items()}
                                 | {"tok/s": f"{record['tokens_per_s']:.0f}"})
        if nonfinite_steps >= cfg.max_nonfinite_steps:
            raise TrainingDiverged(diverged_message(run, cfg, step, nonfinite_steps, means["loss"], grad_norm))
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            checkpoint(step)
    progress.close()
    if cfg.report_to:
        accelerator.end_training()
    if step < total_steps:              # stopped early on purpose: leave a checkpoint to resume from
        checkpoint(step)
        return run
    if step > start_step and (cfg.save_every or not is_sharded(accelerator)):
        checkpoint(step)                # the last step's: a crash in the final save resumes from it
    if is_sharded(accelerator):         # finish on a whole copy of what was trained (distributed.py)
        state = full_trainable_state(method, accelerator)
        method, tokenizer = on_main_process(accelerator, unsharded_method, cfg, state) or (None, tokenizer)
    on_main_process(accelerator, finish_run, cfg, run, method, tokenizer, val_examples)
    return run


def diverged_message(run: Path, cfg: TrainConfig, step: int, count: int, loss: float, grad_norm: float) -> str:
    checkpoints = checkpoint_dirs(run)
    kept = f"its last checkpoint, {checkpoints[-1]}, is kept" if checkpoints else "it has no checkpoint"
    return (f"training stopped at step {step}: the loss ({loss}) or the gradient norm ({grad_norm}) was not finite "
            f"for {count} consecutive step(s) (max_nonfinite_steps={cfg.max_nonfinite_steps}), and those steps "
            f"updated no weight; {kept}. Lower the learning rate (lr={cfg.lr}), keep gradient clipping on "
            f"(max_grad_norm={cfg.max_grad_norm}) or check the data, and start a new run")


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a line a kill cut short."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def _mean_over_processes(accelerator: Accelerator, values: dict) -> dict:
    if accelerator.num_processes == 1:
        return values
    out = {}
    for key, value in values.items():
        tensor = torch.tensor(value, dtype=torch.float64, device=accelerator.device)
        out[key] = accelerator.reduce(tensor, reduction="mean").tolist()
    return out


def finish_run(cfg: TrainConfig, run: Path, method: nn.Module, tokenizer, val_examples: list[dict]) -> None:
    """Save the final state, the method's result on the validation set and its adapter (``method.finish_run``: ComLoRA
    selects the winner), draw the plots: all built in RUN/.final-save, fsynced and moved into the run, then
    complete.json (run_dir.final_save).
    Until then the last step's checkpoint is what a resume starts from."""
    method.eval()
    # the base weights (and their quantization), named in winner.json and the adapter's card
    record = base_model_record(cfg.model, quantization_record(method.model))
    batches = list(validation_batches(val_examples, cfg.batch_size, tokenizer.pad_token_id, method.model.device))
    with final_save(run) as final:
        write_json(final / "parameters.json", {**method.parameter_counts(), "mergeable": bool(method.mergeable)})
        method.finish_run(final, batches, record)
        draw_plots(run, cfg.window, final)
    if checkpoint_dirs(run):
        shutil.rmtree(run / CHECKPOINTS)         # the run is complete: its state/ supersedes them


def draw_plots(run: Path, window: int, into: Path) -> None:
    """Figures 2 and 3 of the run into ``into``; without matplotlib (the ``plots`` extra) a note says how to get
    them."""
    try:
        from comlora.plots import plot_run
    except ImportError as err:
        print(f"note: {run} has no plots ({err}); pip install 'comlora[plots]' to draw them", file=sys.stderr)
        return
    plot_run(run, window, into=into)

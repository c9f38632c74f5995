"""Sharded training (FSDP2, DeepSpeed) in ``comlora train``'s own loop, started by ``accelerate launch --config_file``
with one of ``examples/accelerate/*.yaml``.

While sharded, a process holds only its slice of each weight, so the loop cannot save or select a winner on one
process with the model it trained: at the end every process gathers the trainable tensors whole
(``full_trainable_state``, a collective) and the main process finishes the run (save, winner selection, export)
on a fresh unsharded copy of the method (``unsharded_method``). Checkpoints are Accelerate's ``save_state``
(``checkpoints.save_sharded_checkpoint``).
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from comlora.training.clipping import refuse_unsupported_clipping
from comlora.training.config import MIXED_PRECISION


def with_launcher_mixed_precision(cfg, environ=os.environ):
    """``cfg`` with its mixed precision resolved: ``cfg.mixed_precision`` if set, else the launcher's (``accelerate
    launch`` hands its config's ``mixed_precision`` to the processes as ``ACCELERATE_MIXED_PRECISION``), else ``no``.
    A set value that contradicts a precision the launcher chose is refused; the launcher's ``no`` is also its default
    when nothing was chosen, so there a set value stands."""
    launcher = environ.get("ACCELERATE_MIXED_PRECISION", "").lower() or None
    source = f"the launcher's mixed precision {launcher} (accelerate launch's mixed_precision, in " \
             "ACCELERATE_MIXED_PRECISION)"
    if cfg.mixed_precision is None:
        if launcher not in (None, *MIXED_PRECISION):
            raise ValueError(f"{source} is not supported by comlora train: use one of {', '.join(MIXED_PRECISION)}")
        return replace(cfg, mixed_precision=launcher or "no")
    if launcher not in (None, "no", cfg.mixed_precision):
        raise ValueError(f"--mixed-precision {cfg.mixed_precision} contradicts {source}: give it once, either drop "
                         f"--mixed-precision (mixed_precision in --config) or change the accelerate config")
    return cfg


def use_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """CPU processes started by ``accelerate launch`` with an FSDP config (``ACCELERATE_USE_FSDP=true``): Accelerate
    turns FSDP on for GPUs only and would fall back to plain data parallel over gloo; this switches its state to FSDP
    with the launcher's plugin settings (the ``FSDP_*`` environment), so the model is sharded over gloo as it is over
    NCCL. Used to run FSDP where there is no GPU (tests); nothing changes on GPUs."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU or \
            os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config")
    accelerator.state.fsdp_plugin = plugin
    # AcceleratorState copies PartialState's fields whenever it is instantiated again: set both
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def refuse_unsupported_sharded_options(accelerator: Accelerator, cfg) -> None:
    """Under DeepSpeed the loop runs one micro-batch per optimizer step; per-group clipping needs what
    ``clipping.refuse_unsupported_clipping`` says."""
    refuse_unsupported_clipping(accelerator, cfg.clip_grad)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and cfg.grad_accum != 1:
        raise ValueError("with DeepSpeed, comlora train runs one micro-batch per optimizer step: use --grad-accum 1 "
                         "(and a larger --batch-size)")


def full_trainable_state(method: nn.Module, accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``method`` whole, on the CPU: FSDP2's DTensor shards gathered, DeepSpeed ZeRO-3's
    partitions gathered (ZeRO-3 not run here: no GPU). A collective: every process calls it, in the same order."""
    params = {name: p for name, p in method.named_parameters() if p.requires_grad}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: p.detach().float().cpu().clone() for name, p in params.items()}
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
            for name, p in params.items()}


def unsharded_method(cfg, state: dict[str, torch.Tensor]) -> tuple[nn.Module, object]:
    """(the method on a freshly loaded base with ``state`` copied into its trainable tensors, tokenizer)."""
    from comlora.base_models import load_model_and_tokenizer
    from comlora.methods.registry import build_method
    from comlora.training.run_checkpoints import copy_trainable_tensors

    model, tokenizer = load_model_and_tokenizer(cfg.model, device=cfg.device, dtype=cfg.dtype,
                                                load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit)
    method = build_method(cfg, model).to(model.device)
    copy_trainable_tensors(method, state, "the gathered state")
    return method, tokenizer

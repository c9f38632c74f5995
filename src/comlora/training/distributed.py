"""Sharded training (FSDP2, DeepSpeed) in ``comlora train``'s own loop, started by ``accelerate launch --config_file``
with one of ``examples/accelerate/*.yaml``.

While sharded, a process holds only its slice of each weight, so the loop cannot save or select a winner on one
process with the model it trained: at the end every process gathers the trainable tensors whole
(``full_trainable_state``, a collective) and the main process finishes the run (save, winner selection, export)
on a fresh unsharded copy of the method (``unsharded_method``).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from comlora.training.clipping import refuse_unsupported_clipping


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


def refuse_unsupported_sharded_options(accelerator: Accelerator, cfg, resume: bool) -> None:
    """Checkpoints (``--save-every``, ``--resume``) would hold each process's shards: not supported while sharded;
    under DeepSpeed the loop runs one micro-batch per optimizer step; per-group clipping needs what
    ``clipping.refuse_unsupported_clipping`` says."""
    refuse_unsupported_clipping(accelerator, cfg.clip_grad)
    if is_sharded(accelerator) and (cfg.save_every or resume):
        raise ValueError(f"{accelerator.distributed_type.value} training does not write or resume checkpoints yet: "
                         "run it without --save-every and --resume (the final state/ is still saved)")
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
    from comlora.training.checkpoints import copy_trainable_tensors

    model, tokenizer = load_model_and_tokenizer(cfg.model, device=cfg.device, dtype=cfg.dtype,
                                                load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit)
    method = build_method(cfg, model).to(model.device)
    copy_trainable_tensors(method, state, "the gathered state")
    return method, tokenizer

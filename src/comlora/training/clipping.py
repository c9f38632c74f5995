"""Gradient clipping to ``max_grad_norm`` (c), of every trainable tensor together or of each parameter group on its own
(``TrainConfig.clip_grad``), for ``comlora train``'s loop and the Trainer classes:

    joint:      g   <- g   * min(1, c / (||g||   + 1e-6))   over every trainable tensor (torch.nn.utils.clip_grad_norm_)
    per_group:  g_G <- g_G * min(1, c / (||g_G|| + 1e-6))   for each group G of the method's ``parameter_groups()``:
                                                            the adapter (LoRA, the components, the experts) and the
                                                            router (ComLoRA's selector, a router, a filter)

The paper does not mention clipping. Jointly, ComLoRA's selector, whose gradient norm is tens of times the components'
(the pairwise loss alone reaches it), sets the factor that scales the components' gradient (docs/method.md).
A method with one group (LoRA) clips the same way under both.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from comlora.training.config import CLIP_GRAD

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:                   # a build without torch.distributed has no sharded tensor
    DTensor = ()


def gradient_groups(method: nn.Module, params: list[nn.Parameter]) -> dict[str, list[nn.Parameter]]:
    """The method's parameter groups with a trainable tensor, each as the sub-list of ``params`` (the trainable
    tensors in the order clipping visits them) that belongs to it; a trainable tensor in no group is an error."""
    declared = method.parameter_groups()
    group_of = {id(p): name for name, group in declared.items() for p in group.values()}
    stray = {id(p) for p in params} - set(group_of)
    if stray:
        names = [n for n, p in method.named_parameters() if id(p) in stray]
        raise ValueError(f"{type(method).__name__}: trainable tensors in no parameter group, which per-group "
                         f"clipping would leave out: {names or f'{len(stray)} tensors'}")
    groups = {name: [p for p in params if group_of[id(p)] == name] for name in declared}
    return {name: group for name, group in groups.items() if group}


def _by_mesh(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """The parameters with a gradient, split by the device mesh of a sharded (DTensor) gradient."""
    meshes = defaultdict(list)
    for p in params:
        if p.grad is not None:
            meshes[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    return list(meshes.values())


def gradient_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """||g||_2 over the gradients of ``params`` (0 without any). Sharded (FSDP2) gradients count whole: one norm per
    device mesh, reduced over its mesh, then their norm, as ``Accelerator.clip_grad_norm_`` computes it."""
    norms = [get_total_norm([p.grad for p in group]) for group in _by_mesh(params)]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def clip_gradients(params: list[nn.Parameter], groups: dict[str, list[nn.Parameter]], max_norm: float,
                   mode: str) -> dict[str, float]:
    """Clip the gradients of ``params`` in place as ``mode`` says (module docstring; ``max_norm`` 0 = no clipping).
    Returns the norms before clipping: ``grad_norm`` = ||g|| over ``params``, ``grad_norm_<group>`` = ||g_G||."""
    if mode not in CLIP_GRAD:
        raise ValueError(f"clip_grad must be one of {', '.join(CLIP_GRAD)}, got {mode!r}")
    norms = {name: gradient_norm(group) for name, group in groups.items()}
    total = gradient_norm(params)
    if max_norm > 0:
        clipped = [(params, total)] if mode == "joint" else [(groups[name], norms[name]) for name in groups]
        for group, norm in clipped:
            for on_mesh in _by_mesh(group):
                clip_grads_with_norm_(on_mesh, max_norm, norm)
    return {"grad_norm": float(total)} | {f"grad_norm_{name}": float(norm) for name, norm in norms.items()}


def clip_with_accelerator(accelerator: Accelerator, params: list[nn.Parameter], groups: dict[str, list[nn.Parameter]],
                          max_norm: float, mode: str) -> dict[str, float]:
    """``clip_gradients`` on the true gradients: fp16's loss scale taken out first (once per optimizer step, as the
    scaler's step expects). Under DeepSpeed, whose engine clips the whole gradient itself (``per_group`` is refused
    before training), only the norm it reports."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"grad_norm": float(accelerator.clip_grad_norm_(params, max_norm) if max_norm > 0
                                   else gradient_norm(params))}
    accelerator.unscale_gradients()
    return clip_gradients(params, groups, max_norm, mode)


def refuse_unsupported_clipping(accelerator: Accelerator, mode: str) -> None:
    """``per_group`` needs each group's gradient whole: refused under DeepSpeed (its engine clips the whole gradient,
    to its config's ``gradient_clipping``) and FSDP1 (its flat parameters hold several groups in one tensor)."""
    if mode != "per_group":
        return
    joint = "set clip_grad to joint (comlora train --clip-grad joint; ComLoraTrainer(..., clip_grad='joint'))"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("clip_grad per_group cannot run under DeepSpeed: its engine clips the whole gradient itself "
                         f"(gradient_clipping in its config), so no group can be clipped on its own; {joint}")
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError("clip_grad per_group needs FSDP2 (fsdp_version: 2 in the accelerate config): FSDP1's flat "
                         f"parameters hold several groups in one tensor; or {joint}")

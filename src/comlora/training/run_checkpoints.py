"""Checkpoints of the training loop: trainable tensors, optimizer and scheduler, every process's random state and
the method's training state, written atomically and fsynced; resume falls back past a corrupt one.

A sharded run (FSDP, DeepSpeed) holds only a slice of each tensor per process: its checkpoints are Accelerate's
``save_state`` (each process writes its part) built in the same temp folder and renamed into place the same way,
with the same ``trainer_state.json``, which names the sharding (``sharded``) so that each kind of run resumes only
from its own kind."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from comlora.storage import atomic_write, fsync_path, read_json_object, read_safetensors, write_json, write_safetensors
from comlora.training.processes import on_main_process
from comlora.training.safe_run_dir import (
    CHECKPOINTS,
    RunError,
    checkpoint_dirs,
    commit_folder,
    new_temp_folder,
    temp_folder,
    trained_steps,
)

TRAINER_STATE = "trainer_state.json"


class CheckpointMismatch(ValueError):
    """A readable checkpoint whose tensors do not fit this run's method (another method, config or layout)."""


def trainable_tensors(method: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in method.named_parameters() if p.requires_grad}


def copy_trainable_tensors(method: nn.Module, saved: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``saved`` into the method's trainable tensors, keyed by their names in ``trainable_tensors``."""
    params = trainable_tensors(method)
    unexpected = sorted(k for k in saved if k not in params)
    if unexpected or set(saved) != set(params):
        raise CheckpointMismatch(f"{source} does not match this run's method: missing "
                                 f"{sorted(set(params) - set(saved))[:5]}, unexpected {unexpected[:5]}")
    shapes = [f"{n} {list(saved[n].shape)} (the run's: {list(p.shape)})" for n, p in params.items()
              if saved[n].shape != p.shape]
    if shapes:
        raise CheckpointMismatch(f"{source} does not match this run's method: {len(shapes)} tensors of another "
                                 f"shape, e.g. {shapes[0]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random number generator states (CPU, and its current GPU)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(run: Path, method: nn.Module, optimizer, scheduler, step: int, keep: int,
                    rng_states: list[dict[str, torch.Tensor]]) -> Path:
    """Everything a resume needs, written into a temp folder that is renamed into place when complete.
    ``rng_states[i]`` is process i's ``rng_state()``."""
    final = run / CHECKPOINTS / f"step-{step:08d}"
    if (run / "metrics.jsonl").exists():        # the steps it has seen are on the disk before it counts
        fsync_path(run / "metrics.jsonl")
    tmp = new_temp_folder(final)
    try:
        write_safetensors(tmp / "trainable.safetensors", trainable_tensors(method))
        states = io.BytesIO()           # serialised in memory: torch.save reports a full disk as a RuntimeError
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, states)
        atomic_write(tmp / "optimizer.pt", lambda path: Path(path).write_bytes(states.getbuffer()))
        write_safetensors(tmp / "rng.safetensors",
                          {f"process{i}.{name}": t for i, state in enumerate(rng_states) for name, t in state.items()})
        write_json(tmp / TRAINER_STATE,
                   {"step": step, **(method.training_state() if hasattr(method, "training_state") else {})})
        commit_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)       # a full disk: free what the failed write took
        raise
    for old in checkpoint_dirs(run)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, method: nn.Module, optimizer, scheduler, process_index: int = 0) -> int:
    """Restore a checkpoint in place; returns its optimizer step. Only tensors are unpickled (weights_only).
    The random state is this process's own (process 0's if the checkpoint was written by fewer processes)."""
    copy_trainable_tensors(method, read_safetensors(path / "trainable.safetensors"), f"checkpoint {path}")
    try:
        states = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    except Exception as err:    # noqa: BLE001  (a damaged pickle fails in many ways: EOFError, UnpicklingError, ...)
        raise ValueError(f"{path / 'optimizer.pt'}: not a readable optimizer state ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0]}); the file is corrupt or was cut short") from err
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    rng = read_safetensors(path / "rng.safetensors")
    prefix = f"process{process_index}." if f"process{process_index}.torch" in rng else "process0."
    torch.set_rng_state(rng[prefix + "torch"])
    if torch.cuda.is_available() and prefix + "cuda" in rng:
        torch.cuda.set_rng_state(rng[prefix + "cuda"])
    state = read_json_object(path / TRAINER_STATE, "step")
    if hasattr(method, "load_training_state"):
        method.load_training_state(state)
    return state["step"]


def sharding_of(path: Path) -> str | None:
    """The sharding (``FSDP``, ``DEEPSPEED``) a checkpoint was written under; None for one process or DDP (or an
    unreadable trainer_state.json)."""
    try:
        return read_json_object(path / TRAINER_STATE, "step").get("sharded")
    except (OSError, ValueError):
        return None


def resume_from_checkpoint(run: Path, method: nn.Module, optimizer, scheduler, process_index: int = 0) -> int:
    """Restore the newest checkpoint that loads; returns its step. A corrupt one is skipped with a warning naming
    its problem; with none (or none readable) the run starts again from step 0, saying what was lost. A readable
    checkpoint that does not fit the method stops the resume (CheckpointMismatch) and nothing is touched."""
    problems = []
    for path in reversed(checkpoint_dirs(run)):
        if sharding := sharding_of(path):
            raise RunError(f"checkpoint {path} was written by a sharded ({sharding}) run: resume it as it was "
                           f"trained, with accelerate launch and the same accelerate config")
        try:
            step = load_checkpoint(path, method, optimizer, scheduler, process_index)
        except CheckpointMismatch as err:  # readable but of another method: never start over on top of it
            raise CheckpointMismatch(f"{err}; it was written by another method, config or comlora version, so the run "
                                     f"cannot resume from it. Nothing was changed: resume with the version that wrote "
                                     f"it, or move {run / CHECKPOINTS} away to train again from step 0") from err
        except Exception as err:         # noqa: BLE001  (any reading failure: try the previous checkpoint)
            problems.append(path.name)
            if process_index == 0:
                print(f"warning: checkpoint {path} cannot be loaded ({type(err).__name__}: "
                      f"{(str(err).splitlines() or [''])[0]}); falling back to the previous one", file=sys.stderr)
            continue
        if problems and process_index == 0:
            print(f"warning: resuming from {path.name}, the newest checkpoint that loads", file=sys.stderr)
        return step
    if process_index == 0:
        starting_over(run, f"none of its {len(problems)} checkpoints loads" if problems else "it has no checkpoint")
    return 0


def starting_over(run: Path, found: str) -> None:
    """Say that a resumed run starts again from step 0, and why (``found``)."""
    print(f"note: {run}: {found}, so the {trained_steps(run)} optimizer steps it recorded are lost; training "
          f"starts again from step 0 (--save-every N writes checkpoints to resume from)", file=sys.stderr)


def save_sharded_checkpoint(accelerator, run: Path, method: nn.Module, step: int, keep: int) -> Path:
    """A sharded run's checkpoint: ``accelerator.save_state`` (the model and optimizer as the FSDP / DeepSpeed config
    saves them, the scheduler registered for checkpointing, every process's random state) into a temp folder, then
    ``trainer_state.json``, and the folder renamed into place, as ``save_checkpoint`` does. A collective: every
    process calls it. Accelerate saves the whole model, the frozen base included."""
    final = run / CHECKPOINTS / f"step-{step:08d}"
    tmp = temp_folder(final)

    def start() -> None:
        if (run / "metrics.jsonl").exists():        # the steps it has seen are on the disk before it counts
            fsync_path(run / "metrics.jsonl")
        new_temp_folder(final)

    def commit() -> None:
        try:
            write_json(tmp / TRAINER_STATE, {"step": step, "sharded": accelerator.distributed_type.value,
                                             "num_processes": accelerator.num_processes,
                                             **(method.training_state() if hasattr(method, "training_state") else {})})
            commit_folder(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in checkpoint_dirs(run)[:-keep]:
            shutil.rmtree(old)

    on_main_process(accelerator, start)
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()         # every process's files are in the folder before it is renamed
    on_main_process(accelerator, commit)
    return final


def resume_from_sharded_checkpoint(accelerator, run: Path, method: nn.Module) -> int:
    """Restore a sharded run's newest checkpoint (``accelerator.load_state``, a collective); returns its step.
    There is no falling back past a checkpoint that does not load: every process must load the same one."""
    checkpoints = checkpoint_dirs(run)
    if not checkpoints:
        if accelerator.is_main_process:
            starting_over(run, "it has no checkpoint")
        return 0
    path = checkpoints[-1]
    if sharding_of(path) is None:
        raise RunError(f"checkpoint {path} was not written by a sharded run (or its {TRAINER_STATE} is unreadable): "
                       f"resume it as it was trained, without FSDP / DeepSpeed")
    state = read_json_object(path / TRAINER_STATE, "step")
    accelerator.load_state(str(path))
    if hasattr(method, "load_training_state"):
        method.load_training_state(state)
    return state["step"]

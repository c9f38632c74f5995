"""Atomic file writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file in the same folder, fsync it, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")

    atomic_write(path, write)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors only (no pickle); tensors are made contiguous and moved to the CPU first."""
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt", **(metadata or {})}))


@torch.no_grad()
def load_state_tensors(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor],
                       source: str = "state") -> None:
    """Copy ``saved`` into ``expected``; every missing, unexpected or wrongly shaped tensor is named in one error."""
    problems = [f"missing {k}" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    problems += [f"{k}: saved shape {list(saved[k].shape)}, this model expects {list(v.shape)}"
                 for k, v in expected.items() if k in saved and saved[k].shape != v.shape]
    if problems:
        raise ValueError(f"{source} does not fit this base model (was it saved from another one?):\n  "
                         + "\n  ".join(problems))
    for k, v in expected.items():
        v.copy_(saved[k])

"""Atomic, durable file writes (a reader or a crash never sees a half-written file) and checked reads
(a corrupt or truncated file is a ValueError naming it, never a library's traceback). torch is imported by the
functions that hold tensors, so that the command line's start (the run directory's errors) does not load it."""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    import torch


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries (the names created, renamed or removed in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:          # some file systems cannot fsync a folder; there is nothing more to do there
        if err.errno != errno.EINVAL or not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The mode a plain ``open()`` gives a new file: 0666 less the process's umask (read by setting it and putting
    it back, as there is no other portable way)."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def give_new_file_modes(folder: str | Path) -> None:
    """Give every file below ``folder`` the mode a plain ``open()`` gives: libraries that write through their own
    temporary file leave it private (safetensors' ``save_file``, and so ``save_pretrained``, writes 0600)."""
    mode = new_file_mode()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(Path(root) / name, mode)


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` on a new temporary file beside ``path``, fsync it, rename it onto ``path`` and
    fsync the folder: after a crash ``path`` holds the old content or the new one, whole. The file gets the
    mode a plain ``open()`` gives (0666 less the umask), whatever mode ``write`` left it with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(str(tmp))
        os.chmod(tmp, new_file_mode())
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def json_safe(data):
    """``data`` with every non-finite float (NaN, +-inf) replaced by None: JSON has no such numbers."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def json_line(record: dict) -> str:
    """One JSON line (metrics.jsonl), non-finite numbers written as null."""
    return json.dumps(json_safe(record), allow_nan=False)


def write_json(path: str | Path, data) -> None:
    """Strict JSON (non-finite numbers written as null), written atomically."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """safetensors only (no pickle); tensors are made contiguous and moved to the CPU first."""
    from safetensors.torch import save_file

    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(cpu, tmp, metadata={"format": "pt", **(metadata or {})})
        except SafetensorError as err:         # a full disk, as safetensors reports it
            raise OSError(f"cannot write {path}: {err}") from err

    atomic_write(path, write)


def read_json(path: str | Path):
    """The parsed content of a JSON file; invalid JSON is a ValueError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); the file is corrupt or was cut short") from err


def read_json_object(path: str | Path, *keys: str) -> dict:
    """A JSON file that must hold a mapping with ``keys``; anything else is a ValueError naming the file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path}: {', '.join(missing)} missing (the file is corrupt or not what comlora wrote)")
    return data


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU); a corrupt or truncated file is a ValueError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err}); the file is corrupt or was cut short") from err


def safetensors_shapes(path: str | Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a safetensors file, read from its header alone (no tensor is loaded)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err}); the file is corrupt or was cut short") from err


def state_fit_problems(expected: dict[str, list[int]], saved: dict[str, list[int]]) -> list[str]:
    """Every missing, unexpected or wrongly shaped tensor name of ``saved`` against ``expected`` (name -> shape)."""
    problems = [f"missing {k}" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    problems += [f"{k}: saved shape {list(saved[k])}, this model expects {list(v)}"
                 for k, v in expected.items() if k in saved and list(saved[k]) != list(v)]
    return problems


def summarize(problems: list[str], shown: int = 40) -> str:
    """The first ``shown`` problems on one line, and how many more there are."""
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def load_state_tensors(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor],
                       source: str = "state") -> None:
    """Copy ``saved`` into ``expected``; every missing, unexpected or wrongly shaped tensor is named in one error."""
    import torch

    problems = state_fit_problems({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in saved.items()})
    if problems:
        raise ValueError(f"{source} does not fit this base model (was it saved from another one?): "
                         f"{summarize(problems)}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(saved[k])

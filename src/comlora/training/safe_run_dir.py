"""A run directory's life, safe against crashes, races and full disks.

- One process at a time: ``RunLock`` holds an OS file lock (``flock``) on ``RUN/.lock`` for as long as a
  command works on the run; the kernel drops it when the process dies, so a killed run leaves no stale lock.
  The holder writes its pid into the file, and a refusal names it.
- Folders appear whole: ``commit_folder`` fsyncs a folder built under a temporary name (its files and
  itself), renames it into place and fsyncs the parent (checkpoints, the final save, exports).
- Complete means complete: the final save is built in ``RUN/.final-save/``, moved into the run, and the
  completion marker ``complete.json`` is written last. A run without it is resumable from its last
  checkpoint (the last optimizer step always has one while the final save runs).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from comlora.storage import fsync_path, give_new_file_modes, write_json, write_text
from comlora.training.config import EARLIER_RUN_VALUES, load_yaml

LOCK_FILE = ".lock"
COMPLETE_FILE = "complete.json"
FINAL_SAVE = ".final-save"
CHECKPOINTS = "checkpoints"


def checkpoint_dirs(run: Path) -> list[Path]:
    """The run's checkpoints/step-N folders, oldest first."""
    return sorted((run / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


class RunError(RuntimeError):
    """A refusal or a stop the user has to act on (the command line exits with code 2)."""


class RunLocked(RunError):
    """Another process holds the run directory's lock."""


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` while held (``with RunLock(run, "train"):``).

    ``optional=True`` (commands that only read the run) goes on without a lock where the run folder cannot be
    written (a read-only copy of a finished run).
    """

    def __init__(self, run: str | Path, command: str, optional: bool = False) -> None:
        self.run, self.command, self.optional = Path(run), command, optional
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        path = self.run / LOCK_FILE
        if not self.run.is_dir():
            raise FileNotFoundError(f"{self.run} is not a run directory (no such folder)")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            if self.optional and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return self
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(f"{self.run} is in use by another comlora process ({self._holder(path)}); wait for it "
                            f"to finish, or stop it, then run this again") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} comlora {self.command}\n".encode())
        self.fd = fd
        return self

    @staticmethod
    def _holder(path: Path) -> str:
        try:
            pid, _, command = path.read_text().strip().partition(" ")
        except OSError:
            pid, command = "", ""
        return f"pid {pid}: {command}" if pid else "pid not yet written"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)            # closing the file drops the lock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run(run: str | Path, command: str, optional: bool = False) -> RunLock:
    """The lock of an existing run directory, for a command that reads it or adds to it (select, eval, export)."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (config.yaml is missing)")
    return RunLock(run, command, optional)


# ---- folders written whole --------------------------------------------------------------------
def fsync_tree(folder: Path) -> None:
    """fsync every file below ``folder``, then every folder bottom-up (their entries), ``folder`` last."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(root)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def commit_folder(tmp: Path, final: Path, replace: bool = True) -> Path:
    """Make the fully written folder ``tmp`` the folder ``final``: fsync it, put it in the place of ``final`` (an
    older copy with ``replace``, else only an empty folder), fsync the parent. A crash never leaves a mix under
    the name ``final``: the old folder, the new one, or (while an older copy is being replaced) none. Its files get
    the mode a plain ``open()`` gives, whatever library wrote them."""
    give_new_file_modes(tmp)
    fsync_tree(tmp)
    if final.exists():
        remove(final) if replace else final.rmdir()
    os.replace(tmp, final)
    fsync_path(final.parent)
    return final


def temp_folder(final: Path) -> Path:
    """The ``.tmp-<name>`` folder beside ``final`` in which ``final`` is built."""
    return final.parent / f".tmp-{final.name}"


def new_temp_folder(final: Path) -> Path:
    """An empty ``temp_folder(final)`` (one a crash left there is removed first)."""
    tmp = temp_folder(final)
    if tmp.exists():
        remove(tmp)
    tmp.mkdir(parents=True)
    return tmp


# ---- the final save -----------------------------------------------------------------------------
@contextmanager
def final_save(run: Path):
    """``with final_save(run) as folder:`` write every file of the final save into ``folder`` (what an interrupted
    save left there is removed first); on leaving, ``commit_final_save`` makes it the run's. If writing or moving
    fails (a full disk), the folder is removed and the run stays resumable from its last checkpoint."""
    folder = run / FINAL_SAVE
    if folder.exists():
        remove(folder)
    folder.mkdir()
    try:
        yield folder
        commit_final_save(run)
    except BaseException:
        remove(folder)
        raise


def commit_final_save(run: Path) -> None:
    """Move every entry of ``RUN/.final-save`` into the run (replacing older copies), fsynced, then write the
    completion marker: only from that moment is the run complete. The files get the mode a plain ``open()`` gives."""
    folder = run / FINAL_SAVE
    give_new_file_modes(folder)
    fsync_tree(folder)
    names = sorted(p.name for p in folder.iterdir())
    for name in names:
        if (run / name).exists():
            remove(run / name)
        os.replace(folder / name, run / name)
    fsync_path(run)
    write_json(run / COMPLETE_FILE, {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": names})
    folder.rmdir()
    fsync_path(run)


def is_complete(run: Path) -> bool:
    """The run's final save finished. Runs written before the marker existed count when their layout says so:
    state/ and parameters.json, no checkpoints/ and no final save under way (a run of this version always has
    its last step's checkpoint until complete.json is written)."""
    if (run / COMPLETE_FILE).is_file():
        return True
    return ((run / "state").is_dir() and (run / "parameters.json").is_file() and not (run / CHECKPOINTS).exists()
            and not (run / FINAL_SAVE).exists())


def trained_steps(run: Path) -> int:
    """How many optimizer steps metrics.jsonl records (what a run without a checkpoint loses)."""
    try:
        return sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def require_complete(run: Path) -> None:
    """Refuse a run whose final save did not finish, saying how to finish or restart it."""
    if is_complete(run):
        return
    resume = f"comlora train --resume --config {run / 'config.yaml'} --out {run}"
    if checkpoint_dirs(run):
        raise RunError(f"{run} has not finished ({COMPLETE_FILE} is missing: it is still training, or it was stopped "
                       f"before its final save completed); finish it from its last checkpoint with: {resume}")
    raise RunError(f"{run} has not finished ({COMPLETE_FILE} is missing) and has no checkpoint: the "
                   f"{trained_steps(run)} optimizer steps it trained are lost; "
                   f"train it again from step 0 with: {resume}")


# ---- starting or resuming a run ---------------------------------------------------------------
def check_run_dir(cfg, resume: bool) -> None:
    """Refuse an ``--out`` that cannot take this run, writing nothing: a file, a folder holding anything, or
    (``resume``) a folder without a run, with other options, or complete."""
    run = Path(cfg.out)
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(f"--out {run} is a file, not a folder: choose a new folder for the run")
    if not resume:
        ignored = {run / LOCK_FILE, *leftovers(run)}
        if run.is_dir() and any(p not in ignored for p in run.iterdir()):
            raise FileExistsError(f"run directory {run} is not empty: choose another --out, or --resume it")
        return
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"--resume: {run} holds no run (config.yaml is missing)")
    given, written = cfg.to_dict(), load_yaml(config_file)
    earlier = {k: v for k, v in EARLIER_RUN_VALUES.items() if k not in written}    # what the run trained with
    # any other option newer than the run: its default; options in an earlier place: where they are now (from_dict)
    saved = type(cfg).from_dict({**earlier, **written}).to_dict()
    diff = sorted(k for k in set(saved) | set(given) if k != "out" and saved.get(k) != given.get(k))
    if diff:
        keep = "".join(f" --set {k}={v}" for k, v in earlier.items())
        raise ValueError(f"--resume: the options differ from the run's config.yaml in {diff}; resume with the run's "
                         f"own options: comlora train --resume --config {config_file}{keep} --out {run}")
    if is_complete(run):
        raise ValueError(f"--resume: the run in {run} is already complete (it has {COMPLETE_FILE})")


def leftovers(run: Path) -> list[Path]:
    """What a killed process left half written in a run: temporary files and checkpoint folders (atomic_write,
    new_temp_folder), never a finished file."""
    return [*run.glob(".*.tmp"), *(run / CHECKPOINTS).glob(".tmp-*")]


def open_run_dir(cfg, resume: bool) -> RunLock:
    """Lock ``cfg.out`` (created if need be), check it again under the lock, and write config.yaml for a new run.
    Called once every check that can fail before training has passed: a failed start leaves nothing behind."""
    run = Path(cfg.out)
    check_run_dir(cfg, resume)
    run.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run, "train --resume" if resume else "train").acquire()
    try:
        check_run_dir(cfg, resume)            # again: another process may have started a run here meanwhile
        for leftover in leftovers(run):
            remove(leftover)
        if not resume:
            write_text(run / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except BaseException:
        lock.release()
        raise
    return lock

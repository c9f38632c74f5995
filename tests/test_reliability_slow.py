"""Slow fault injection (`make test-slow`): kill -9 at every commit point of a run and at random moments, many
times in a row, each followed by a resume; a real full file system (a small tmpfs) at every point of a run;
two `comlora train` processes started on one directory. Tiny models. The killed runs are forked children of
this process (comlora already imported: a kill lands in the work, not in the imports), killed with SIGKILL."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from test_reliability import SRC, assert_same_run, commit_points, one_thread, train_args  # noqa: F401

from comlora.cli import main
from comlora.training.safe_run_dir import COMPLETE_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_tiny_text_model, write_commonsense_root

    root = tmp_path_factory.mktemp("reliability-slow")
    return make_tiny_text_model(root), write_commonsense_root(root / "data")


def forked_train(argv, run, kill_at: int = 0):
    """Start ``comlora ARGV`` in a forked child that SIGKILLs itself just before its ``kill_at``-th commit point
    in ``run`` (0: never); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        count, real_replace, real_rename = [0], os.replace, os.rename

        def counted(real):
            def op(src, dst, *args, **kwargs):
                if os.path.realpath(str(dst)).startswith(os.path.realpath(run) + os.sep):
                    count[0] += 1
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                return real(src, dst, *args, **kwargs)
            return op

        os.replace, os.rename = counted(real_replace), counted(real_rename)
        main(argv)
        code = 0
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    finally:
        os._exit(code)


def wait_status(pid: int, timeout: float | None = None) -> int | None:
    """The child's exit code (-signal if killed), or None if it still runs after ``timeout`` seconds."""
    deadline = None if timeout is None else time.time() + timeout
    while True:
        done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.time() > deadline:
            return None
        time.sleep(0.02)


def finish(model_dir, data, run, *extra) -> None:
    """Resume a killed run (or start it again if it was killed before its config.yaml existed)."""
    main(train_args(model_dir, data, run, *extra, *(["--resume"] if (run / "config.yaml").is_file() else [])))


def test_kill_at_every_commit_point_then_resume_ends_bitwise_equal(tiny, tmp_path, monkeypatch):
    """A commit point is each rename into the run: every atomic file (config.yaml, each checkpoint file and folder,
    each file of the final save, the completion marker) and each folder moved into place. The child is killed
    just before the k-th one, for every k; the resumed run must equal the uninterrupted one bit for bit."""
    model_dir, data = tiny
    reference = tmp_path / "reference"
    points = commit_points(train_args(model_dir, data, reference), reference, monkeypatch)
    assert len(points) > 20 and points[0] == "config.yaml" and points[-1] == COMPLETE_FILE
    for kill_at in range(1, len(points) + 1):
        run = tmp_path / f"kill-{kill_at}"
        assert wait_status(forked_train(train_args(model_dir, data, run), run, kill_at)) == -9, points[kill_at - 1]
        assert not (run / COMPLETE_FILE).exists()
        finish(model_dir, data, run)
        assert_same_run(reference, run)


def test_random_kills_many_times_in_a_row_then_resume_ends_bitwise_equal(tiny, tmp_path):
    """SIGKILL after a random delay (up to 70% of the time a whole run takes), then resume, killed again ... until
    an attempt finishes; 12 steps, a checkpoint every 3; 5 trials."""
    model_dir, data = tiny
    extra = ("--max-steps", "12", "--save-every", "3")
    reference = tmp_path / "reference"
    main(train_args(model_dir, data, reference, *extra))
    started = time.time()                   # how long a forked child takes for a whole run
    assert wait_status(forked_train(train_args(model_dir, data, tmp_path / "timed", *extra), tmp_path / "timed")) == 0
    whole_run = time.time() - started
    rng, total_kills = random.Random(0), 0
    for trial in range(5):
        run, kills = tmp_path / f"run-{trial}", 0
        while True:
            resume = ["--resume"] if (run / "config.yaml").is_file() else []
            pid = forked_train(train_args(model_dir, data, run, *extra, *resume), run)
            status = wait_status(pid, rng.uniform(0.0, 0.7 * whole_run) if kills < 10 else None)  # then let it end
            if status is None:
                os.kill(pid, signal.SIGKILL)
                assert wait_status(pid) == -9
                kills += 1
                continue
            assert status == 0
            break
        total_kills += kills
        assert_same_run(reference, run)
    assert total_kills >= 5


def test_a_full_file_system_at_every_point_of_a_run(tiny, tmp_path):
    """--out on a tmpfs too small for the run, at sizes from 'fills before config.yaml' to 'fills in the final
    save': every attempt stops with one line naming ENOSPC (or succeeds), the folder is then enlarged and the
    run resumed, and it ends equal to an uninterrupted run."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    model_dir, data = tiny
    reference = tmp_path / "reference"
    main(train_args(model_dir, data, reference))
    need = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    failed_in = set()
    try:
        for size_kib in range(8, need // 1024 + 1200, 96):
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)], check=True)
            run = mount / "run"
            try:
                main(train_args(model_dir, data, run))
                stopped = False
            except SystemExit as err:
                assert err.code == 2
                stopped = True
            if stopped:
                failed_in.add("final save" if (run / "checkpoints" / "step-00000004").is_dir() else
                              "checkpoint" if (run / "checkpoints").exists() else "start")
                assert not (run / ".final-save").exists() and not list(run.glob("checkpoints/.tmp-*"))
                subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
                finish(model_dir, data, run)
            assert_same_run(reference, run)
            subprocess.run(["umount", str(mount)], check=True)
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False, capture_output=True)
    assert {"checkpoint", "final save"} <= failed_in


@pytest.mark.parametrize("delay", [0.0, 0.5, 3.0])
def test_two_trains_started_on_one_directory(tiny, tmp_path, delay):
    """The issue's `comlora train ... --out runs/c & sleep 0.5; comlora train ... --lr 1e-3 --out runs/c`: one
    run finishes whole, the other is refused (exit 2, naming the holder or the non-empty folder)."""
    model_dir, data = tiny
    run = tmp_path / "c"
    env = dict(os.environ, PYTHONPATH=SRC)
    first = subprocess.Popen([sys.executable, "-m", "comlora", *train_args(model_dir, data, run, "--max-steps", "8")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    second = subprocess.run([sys.executable, "-m", "comlora",
                             *train_args(model_dir, data, run, "--max-steps", "8", "--lr", "0.001")],
                            env=env, capture_output=True, text=True)
    first_err = first.communicate(timeout=600)[1]
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], (first_err[-500:], second.stderr[-500:])
    loser = second if second.returncode == 2 else first
    loser_err = loser.stderr if loser is second else first_err
    assert "in use by another comlora process (pid" in loser_err or "is not empty" in loser_err
    winner_lr = 0.01 if first.returncode == 0 else 0.001
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == winner_lr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)) and (run / COMPLETE_FILE).is_file()
    shutil.rmtree(run)

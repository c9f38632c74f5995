"""Fault injection on tiny models: kills, full disks, concurrent runs, corrupt and truncated files, non-finite
values. Each fault ends in a clear one-line error (exit code 2) or in a run that resumes to the same bits as an
uninterrupted one. The many-kills loop and a real full file system are in test_reliability_slow.py."""

import errno
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from comlora.cli import main
from comlora.storage import read_json, write_json, write_text
from comlora.training.config import TrainConfig
from comlora.training.safe_run_dir import COMPLETE_FILE, LOCK_FILE, RunLock, RunLocked, open_run_dir

# A child `comlora` process that kills itself with SIGKILL just before the KILL_AT-th commit point inside the run
# directory (an os.replace / os.rename whose target is under RUN: each atomic file, each folder, the completion
# marker), or that pauses right after committing the file PAUSE_AFTER until the file GO exists.
KILL_CHILD = r"""
import os, signal, sys, time
run = os.path.realpath(os.environ["RUN_DIR"])
kill_at, pause_after = int(os.environ.get("KILL_AT", "0")), os.environ.get("PAUSE_AFTER")
count = [0]
def counted(real):
    def op(src, dst, *args, **kwargs):
        target = os.path.realpath(str(dst))
        if not target.startswith(run + os.sep):
            return real(src, dst, *args, **kwargs)
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(src, dst, *args, **kwargs)
        if os.path.relpath(target, run) == pause_after:
            open(os.environ["GO"] + ".paused", "w").close()
            while not os.path.exists(os.environ["GO"]):
                time.sleep(0.05)
        return result
    return op
os.replace, os.rename = counted(os.replace), counted(os.rename)
from comlora.cli import main
main(sys.argv[1:])
"""
SRC = str(Path(__file__).resolve().parents[1] / "src")


def train_args(model_dir, data_root, out, *extra):
    """A 4-step ComLoRA run with dropout and noise (so that random state matters), a checkpoint every 2 steps."""
    return ["train", "--model", str(model_dir), "--data-root", str(data_root), "--out", str(out), "--device", "cpu",
            "--train-per-task", "2", "--val-size", "6", "--eval-size", "4", "--batch-size", "4", "--max-steps", "4",
            "--lr", "0.01", "--window", "2", "--save-every", "2", "--lora-dropout", "0.1",
            "--set", "method_options.selector_heads=4", "--set", "method_options.selector_ffn_dim=32", *extra]


def child_env(run, **values):
    """A child's environment: this source tree, one thread (as ``one_thread`` gives this process: the same bits)."""
    return dict(os.environ, RUN_DIR=str(run), PYTHONPATH=SRC, OMP_NUM_THREADS="1",
                **{k: str(v) for k, v in values.items()})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_child(args, run, kill_at=0, timeout=600):
    return subprocess.run([sys.executable, "-c", KILL_CHILD, *args], env=child_env(run, KILL_AT=kill_at),
                          capture_output=True, text=True, timeout=timeout)


def commit_points(argv, run, monkeypatch) -> list[str]:
    """Run the command line in this process and return its commit points in ``run`` (what KILL_AT counts)."""
    points = []
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def op(src, dst, *args, real=real, **kwargs):
            target = os.path.realpath(str(dst))
            if target.startswith(os.path.realpath(run) + os.sep):
                points.append(os.path.relpath(target, os.path.realpath(run)))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, op)
    main(argv)
    monkeypatch.undo()
    return points


def final_files(run: Path) -> dict:
    """Everything a finished run's weights and choices are: every tensor of state/ and adapter/, winner.json."""
    tensors = {f"{p.parent.name}/{p.name}/{k}": v for p in sorted(run.glob("*/*.safetensors"))
               for k, v in load_file(str(p)).items()}
    return {"tensors": tensors, "winner": read_json(run / "winner.json")}


def assert_same_run(a: Path, b: Path) -> None:
    fa, fb = final_files(a), final_files(b)
    assert fa["tensors"].keys() == fb["tensors"].keys()
    for k in fa["tensors"]:
        assert torch.equal(fa["tensors"][k], fb["tensors"][k]), k
    assert fa["winner"] == fb["winner"]
    timing = ("tokens_per_s", "step_seconds", "peak_rss_mb")
    rows = lambda run: [{k: v for k, v in json.loads(line).items() if k not in timing}  # noqa: E731
                        for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows(a) == rows(b)
    assert (b / COMPLETE_FILE).is_file() and not (b / "checkpoints").exists() and not (b / ".final-save").exists()


def cli_error(argv, capsys) -> str:
    """Run the command line, which must refuse with exit code 2 and a one-line message (no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """A tiny model folder, a data root and one uninterrupted reference run, shared by the tests of this file."""
    from conftest import make_tiny_text_model, write_commonsense_root

    root = tmp_path_factory.mktemp("reliability")
    model_dir = make_tiny_text_model(root)
    data = write_commonsense_root(root / "data")
    reference = root / "reference"
    with pytest.MonkeyPatch.context() as monkeypatch:
        points = commit_points(train_args(model_dir, data, reference), reference, monkeypatch)
    (root / "commit-points").write_text("\n".join(points))
    return model_dir, data, reference


# ---- kills ---------------------------------------------------------------------------------------
def test_kill_inside_the_final_save_resumes_to_the_same_bits(tiny, tmp_path, capsys):
    """kill -9 once state/ is moved into the run and winner.json not yet (every other commit point: the slow
    tests): no complete.json, eval refuses saying how to finish, --resume ends bitwise equal to the reference."""
    model_dir, data, reference = tiny
    points = (reference.parent / "commit-points").read_text().splitlines()
    assert points[0] == "config.yaml" and points[-1] == COMPLETE_FILE and points[-3:-1] == ["state", "winner.json"]
    run = tmp_path / "killed"
    killed = run_child(train_args(model_dir, data, run), run, kill_at=len(points) - 1)
    assert killed.returncode == -9
    assert not (run / COMPLETE_FILE).exists() and (run / "checkpoints" / "step-00000004").is_dir()
    assert (run / "state").is_dir() and not (run / "winner.json").exists()
    message = cli_error(["eval", "--run", str(run), "--data-root", str(data), "--limit", "1"], capsys)
    assert "has not finished" in message and f"--resume --config {run / 'config.yaml'}" in message
    main(train_args(model_dir, data, run, "--resume"))
    assert_same_run(reference, run)


# ---- concurrent runs -------------------------------------------------------------------------------
def test_a_second_command_on_a_run_in_use_is_refused_naming_the_holder(tiny, tmp_path, capsys):
    model_dir, data, reference = tiny
    run, go = tmp_path / "busy", tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, *train_args(model_dir, data, run)],
                             env=child_env(run, PAUSE_AFTER="checkpoints/step-00000002", GO=go),
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "child.err").open("w"))
    try:
        deadline = time.time() + 600
        while not Path(f"{go}.paused").exists():      # the child holds the lock, paused after its first checkpoint
            assert child.poll() is None and time.time() < deadline, "the training child never got to step 2"
            time.sleep(0.1)
        holder = f"pid {child.pid}: comlora train"
        for argv in (train_args(model_dir, data, run, "--resume"),
                     ["select", str(run)], ["export", str(run), "--out", str(tmp_path / "exported")],
                     ["eval", "--run", str(run), "--data-root", str(data), "--limit", "1"]):
            message = cli_error(argv, capsys)
            assert "in use by another comlora process" in message and holder in message, message
        assert "not empty" in cli_error(train_args(model_dir, data, run, "--lr", "0.001"), capsys)
        go.touch()
        assert child.wait(timeout=600) == 0, (tmp_path / "child.err").read_text()[-2000:]
    finally:
        child.kill()
    assert not (tmp_path / "exported").exists()
    assert_same_run(reference, run)


def test_the_run_directory_is_checked_again_under_the_lock(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = TrainConfig(out=str(run))
    run.mkdir()
    with RunLock(run, "train"):             # another start holds the lock and is writing its config.yaml
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}: comlora train"):
            open_run_dir(cfg, resume=False)
    assert not (run / "config.yaml").exists()
    real_acquire = RunLock.acquire

    def other_run_first(self):              # another start wrote its run between this one's check and its lock
        (run / "config.yaml").write_text("lr: 0.001\n")
        return real_acquire(self)

    monkeypatch.setattr(RunLock, "acquire", other_run_first)
    with pytest.raises(FileExistsError, match="not empty"):
        open_run_dir(cfg, resume=False)
    assert (run / "config.yaml").read_text() == "lr: 0.001\n"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from comlora.training.safe_run_dir import RunLock; "
                               "RunLock(sys.argv[2], 'train').acquire();"
                               "print('locked', flush=True); time.sleep(600)", SRC, str(tmp_path / "run")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
        RunLock(tmp_path / "run", "eval").acquire()
    holder.kill()
    holder.wait()
    with RunLock(tmp_path / "run", "eval"):
        assert (tmp_path / "run" / LOCK_FILE).read_text().split()[0] == str(os.getpid())


# ---- full disk ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["checkpoints", ".final-save"])
def test_a_full_disk_stops_with_one_line_and_the_run_resumes_to_the_same_bits(tiny, tmp_path, capsys, monkeypatch,
                                                                               where):
    """ENOSPC from the writer of safetensors files inside the first checkpoint, or inside the final save."""
    import safetensors.torch  # what comlora.storage.write_safetensors calls

    model_dir, data, reference = tiny
    real_save = safetensors.torch.save_file

    def full_disk(tensors, path, metadata=None):
        if f"/{where}/" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(tensors, path, metadata=metadata)

    run = tmp_path / "run"
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert "No space left on device" in cli_error(train_args(model_dir, data, run), capsys)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert not (run / COMPLETE_FILE).exists()
    assert not list((run / "checkpoints").glob(".tmp-*")) and not list(run.glob(".*.tmp"))
    assert not (run / ".final-save").exists()              # what the failed write took is freed
    if where == ".final-save":              # the last step's checkpoint holds the whole training
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    else:
        assert not list((run / "checkpoints").iterdir())
        assert "has no checkpoint" in cli_error(["export", str(run), "--out", str(tmp_path / "x")], capsys)
    main(train_args(model_dir, data, run, "--resume"))
    assert_same_run(reference, run)


# ---- corrupt and truncated files --------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CHECKPOINT_DAMAGE = {
    "trainable.safetensors truncated": ("trainable.safetensors", truncate, "not a valid safetensors file"),
    "optimizer.pt garbage": ("optimizer.pt", lambda p: p.write_bytes(b"not a torch file\n" * 30), "UnpicklingError"),
    "optimizer.pt empty": ("optimizer.pt", lambda p: p.write_bytes(b""), "EOFError"),
    "optimizer.pt truncated": ("optimizer.pt", truncate, "RuntimeError"),
    "rng.safetensors truncated": ("rng.safetensors", truncate, "not a valid safetensors file"),
    "trainer_state.json cut": ("trainer_state.json", truncate, "trainer_state.json: not valid JSON"),
}


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_good_one(tiny, tmp_path, capsys):
    """Each kind of damage to the newest checkpoint, at the loading level (what is restored, what is said); one of
    them end to end (the resumed run bitwise equal); every checkpoint damaged: training starts again from 0."""
    from comlora.base_models import load_model_and_tokenizer
    from comlora.cli import build_parser, train_config_from_args
    from comlora.methods.registry import build_method
    from comlora.training.loop import train
    from comlora.training.run_checkpoints import resume_from_checkpoint, trainable_tensors

    model_dir, data, reference = tiny
    argv = train_args(model_dir, data, tmp_path / "killed", "--save-every", "1", "--keep-checkpoints", "3")
    cfg = train_config_from_args(build_parser().parse_args(argv))
    train(cfg, stop_after=3)                         # as if killed after step 3
    killed = tmp_path / "killed"
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000001", "step-00000002",
                                                                         "step-00000003"]
    step2 = load_file(str(killed / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    method = build_method(cfg, load_model_and_tokenizer(str(model_dir), device="cpu")[0])
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for label, (name, damage, problem) in CHECKPOINT_DAMAGE.items():
        run = tmp_path / label.replace(" ", "-")
        shutil.copytree(killed, run)
        damage(run / "checkpoints" / "step-00000003" / name)
        capsys.readouterr()
        assert resume_from_checkpoint(run, method, optimizer, scheduler) == 2, label
        err = capsys.readouterr().err
        assert f"warning: checkpoint {run / 'checkpoints' / 'step-00000003'} cannot be loaded" in err, label
        assert problem in err and "resuming from step-00000002" in err, (label, err)
        assert all(torch.equal(t, step2[k]) for k, t in trainable_tensors(method).items()), label
    main(train_args(model_dir, data, run, "--save-every", "1", "--keep-checkpoints", "3", "--resume"))
    assert_same_run(reference, run)                  # the last damage, end to end
    run = tmp_path / "all-damaged"
    shutil.copytree(killed, run)
    for step in (1, 2, 3):
        truncate(run / "checkpoints" / f"step-0000000{step}" / "trainable.safetensors")
    assert resume_from_checkpoint(run, method, optimizer, scheduler) == 0
    assert "none of its 3 checkpoints loads, so the 3 optimizer steps it recorded are lost" in capsys.readouterr().err


def test_a_checkpoint_of_another_method_is_refused_untouched(tiny, tmp_path, capsys):
    """A readable checkpoint of another method (other tensor names, or the same names with other shapes) stops the
    resume with exit 2, and the run's files stay byte for byte as they were."""
    from comlora.cli import build_parser, train_config_from_args
    from comlora.training.loop import train

    model_dir, data, _ = tiny
    lora = lambda out, *extra: ["train", "--method", "lora", "--model", str(model_dir), "--data-root", str(data),  # noqa: E731
                                "--out", str(out), "--device", "cpu", "--train-per-task", "2", "--val-size", "6",
                                "--eval-size", "4", "--batch-size", "4", "--max-steps", "4", "--lr", "0.01",
                                "--save-every", "1", "--lora-dropout", "0.1", *extra]

    foreign = tmp_path / "foreign"
    train(train_config_from_args(build_parser().parse_args(lora(foreign))), stop_after=2)
    trainable = foreign / "checkpoints" / "step-00000002" / "trainable.safetensors"
    save_file({k.replace("lora_A", "lora_C"): v for k, v in load_file(str(trainable)).items()}, str(trainable))
    before = {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    message = cli_error(lora(foreign, "--resume"), capsys)
    assert "step-00000002 does not match this run's method" in message and "lora_C" in message
    assert (f"Nothing was changed: resume with the version that wrote it, or move {foreign / 'checkpoints'} away"
            in message)
    assert {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file() and p.name != LOCK_FILE} == before
    # the names, another shape
    save_file({k.replace("lora_C", "lora_A"): v[..., :1].contiguous() if "lora_C" in k else v
               for k, v in load_file(str(trainable)).items()}, str(trainable))
    before = {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    message = cli_error(lora(foreign, "--resume"), capsys)
    assert "step-00000002 does not match this run's method: " in message and "tensors of another shape, e.g." in message
    assert {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file() and p.name != LOCK_FILE} == before


def test_every_file_we_read_corrupt_or_truncated_is_a_one_line_error_naming_it(tiny, tmp_path, capsys):
    model_dir, data, reference = tiny
    base = ["--data-root", str(data), "--limit", "1", "--greedy", "--max-new-tokens", "2", "--tasks", "boolq"]

    def damaged(name: str, change) -> Path:
        run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(reference, run)
        change(run / name)
        return run

    cases = [
        ("config.yaml", lambda p: p.write_text("lr: [unclosed\n"), "config.yaml: not valid YAML"),
        ("config.yaml", lambda p: p.write_text(p.read_text().replace("seed: 0", "seed: 1.5")),
         "config.yaml: TrainConfig: seed must be an integer"),
        ("config.yaml", lambda p: p.write_text(p.read_text().replace("lr: 0.01", "lr: .nan")),
         "config.yaml: TrainConfig: lr must be a finite number"),
        ("state/comlora_config.json", truncate, "comlora_config.json: not valid JSON"),
        ("state/comlora_config.json", lambda p: p.write_text("[]"), "comlora_config.json: expected a JSON object"),
        ("state/comlora_config.json", lambda p: p.write_text(p.read_text().replace('"r": 8', '"r": 1000000000')),
         "comlora_model.safetensors does not fit comlora_config.json"),
        ("state/comlora_config.json", lambda p: p.write_text(p.read_text().replace('"k_proj",', '')),
         "unexpected model.layers.0.self_attn.k_proj.lora_A"),
        ("state/comlora_config.json", lambda p: p.write_text(p.read_text().replace('"winner": ', '"winner": 7, "x": ')),
         "winner must be null or a component"),
        ("state/comlora_model.safetensors", truncate, "comlora_model.safetensors: not a valid safetensors file"),
        ("state/comlora_model.safetensors", lambda p: p.write_bytes(b"garbage!" * 40),
         "comlora_model.safetensors: not a valid safetensors file"),
        ("state", lambda p: shutil.rmtree(p), "comlora_config.json is missing"),
    ]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, change, expected in cases:
        run = damaged(name, change)
        for argv in (["eval", "--run", str(run), *base], ["export", str(run), "--out", str(tmp_path / "never")],
                     ["select", str(run)]):
            message = cli_error(argv, capsys)
            assert expected in message and str(run) in message, (name, expected, message)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 500_000    # KiB: r=1e9 never allocated
    assert not (tmp_path / "never").exists()

    # compare reads parameters.json and the evaluations; the demo reads winner.json
    run = damaged("parameters.json", truncate)
    assert "parameters.json: not valid JSON" in cli_error(["compare", str(run)], capsys)
    run = damaged("winner.json", truncate)
    with pytest.raises(ValueError, match="winner.json: not valid JSON"):
        read_json(run / "winner.json")
    # metrics.jsonl: a line cut short by a kill is dropped by --resume (test_cli); the plots name a corrupt one
    from comlora.plots import plot_run

    run = damaged("metrics.jsonl", lambda p: p.write_text(p.read_text().replace('"step": 2', '"step": 2,,')))
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        plot_run(run)


def test_a_peft_adapter_that_disagrees_with_its_weights_or_its_base_is_refused(tiny, tmp_path, capsys):
    model_dir, data, reference = tiny
    base = ["eval", "--model", str(model_dir), "--data-root", str(data), "--limit", "1", "--greedy",
            "--max-new-tokens", "2", "--tasks", "boolq", "--out", str(tmp_path / "ev")]

    def adapter(change) -> Path:
        path = tmp_path / f"adapter-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(reference / "adapter", path)
        change(path)
        return path

    def edit_config(**values):
        def change(path):
            config = json.loads((path / "adapter_config.json").read_text())
            config.update(values)
            (path / "adapter_config.json").write_text(json.dumps(config))
        return change

    cases = [
        (edit_config(r=16), "lora_A.weight: saved shape [8, 32], this model expects [16, 32]"),
        (edit_config(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
         "unexpected base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"),
        (edit_config(target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "o_proj"]),
         "missing base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"),
        (edit_config(r=10**9), "this model expects [1000000000, 32]"),
        (lambda p: truncate(p / "adapter_model.safetensors"),
         "adapter_model.safetensors: not a valid safetensors file"),
        (lambda p: truncate(p / "adapter_config.json"), "adapter_config.json: not valid JSON"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    ]
    for change, expected in cases:
        path = adapter(change)
        message = cli_error([*base, "--adapter", str(path)], capsys)
        assert expected in message and str(path) in message, message
    main([*base, "--adapter", str(adapter(lambda p: None))])           # the untouched adapter loads


# ---- unfinished runs, failed starts ----------------------------------------------------------------
def test_a_failed_start_writes_nothing_and_the_corrected_retry_needs_no_resume(tiny, tmp_path, capsys):
    model_dir, data, reference = tiny
    run = tmp_path / "run"
    shutil.copytree(model_dir, tmp_path / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    for argv, expected in [
        (train_args(model_dir, data, run, "--batch-size", "400"), "fewer than one optimizer step needs"),
        (train_args(tmp_path / "no-weights", data, run), "is not a complete model"),
        (train_args(model_dir, tmp_path / "nowhere", run), "nowhere"),
        (train_args(model_dir, data, run, "--set", "weight_decay=-1"), "weight_decay must be >= 0"),
        (train_args(model_dir, data, run, "--lr", "inf"), "lr must be a finite number, got inf"),
        (train_args(model_dir, data, run, "--set", "max_grad_norm=-5"), "max_grad_norm must be >= 0"),
        (train_args(model_dir, data, run, "--set", "seed=1.5"), "seed must be an integer >= 0, got 1.5"),
        (train_args(model_dir, data, run, "--set", "method_options.noise_alpha=.nan"), "noise_alpha must be a finite"),
    ]:
        assert expected in cli_error(argv, capsys)
        assert not run.exists(), argv
    run.mkdir()                                   # an empty folder stays empty (no lock file either)
    assert "fewer than one" in cli_error(train_args(model_dir, data, run, "--batch-size", "400"), capsys)
    assert not list(run.iterdir())
    main(train_args(model_dir, data, run, "--max-steps", "1", "--save-every", "0"))
    assert (run / COMPLETE_FILE).is_file()


def test_unfinished_runs_say_how_to_finish_or_restart(tiny, tmp_path, capsys):
    model_dir, data, reference = tiny
    run = tmp_path / "run"
    main(train_args(model_dir, data, run, "--save-every", "0"))
    for path in run.iterdir():                   # as if killed after step 4, before the last step's checkpoint
        if path.name not in ("config.yaml", "metrics.jsonl", LOCK_FILE):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    message = cli_error(["export", str(run), "--out", str(tmp_path / "x")], capsys)
    assert "has no checkpoint: the 4 optimizer steps it trained are lost" in message
    assert f"comlora train --resume --config {run / 'config.yaml'} --out {run}" in message
    message = cli_error(["train", "--resume", "--out", str(run)], capsys)    # no flags: the run's options differ
    assert f"--config {run / 'config.yaml'}" in message
    main(["train", "--resume", "--config", str(run / "config.yaml"), "--out", str(run)])
    assert "the 4 optimizer steps it recorded are lost; training starts again from step 0" in capsys.readouterr().err
    assert_same_run(reference, run)
    assert "already complete" in cli_error(["train", "--resume", "--config", str(run / "config.yaml"),
                                            "--out", str(run)], capsys)
    # a run finished by a comlora without completion markers still counts as complete
    (run / COMPLETE_FILE).unlink()
    main(["export", str(run), "--out", str(tmp_path / "legacy")])
    assert (tmp_path / "legacy" / "adapter_model.safetensors").is_file()


# ---- non-finite values ------------------------------------------------------------------------------
def test_divergence_stops_with_exit_2_and_keeps_the_last_checkpoint(tiny, tmp_path, capsys):
    """lr=1e30 without clipping: step 1 is finite and throws the weights far; step 2's loss is NaN."""
    model_dir, data, reference = tiny
    run = tmp_path / "run"
    message = cli_error(train_args(model_dir, data, run, "--lr", "1e30", "--max-grad-norm", "0", "--save-every", "1"),
                        capsys)
    assert "training stopped at step 2: the loss (nan) or the gradient norm (nan) was not finite" in message
    assert f"its last checkpoint, {run / 'checkpoints' / 'step-00000001'}, is kept" in message
    assert not (run / COMPLETE_FILE).exists() and not (run / "winner.json").exists()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and math.isfinite(rows[0]["loss"]) and "skipped" not in rows[0]
    assert rows[1]["skipped"] is True and rows[1]["loss"] is None and rows[1]["grad_norm"] is None
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    weights = load_file(str(run / "checkpoints" / "step-00000001" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_steps_are_skipped_up_to_max_nonfinite_steps(tiny, tmp_path, monkeypatch):
    """One NaN step with max_nonfinite_steps=2: that step updates no weight, the run finishes."""
    from comlora.methods.comlora.model import ComLoraModel
    from comlora.training.loop import train

    model_dir, data, reference = tiny
    real = ComLoraModel.training_loss
    calls = []

    def nan_at_step_2(self, input_ids, attention_mask, labels, step, total_steps):
        loss, parts = real(self, input_ids, attention_mask, labels, step, total_steps)
        calls.append(step)
        if step == 1:
            return loss * float("nan"), {**parts, "loss": float("nan")}
        return loss, parts

    monkeypatch.setattr(ComLoraModel, "training_loss", nan_at_step_2)
    values = yaml.safe_load(yaml.safe_dump(dict(model=str(model_dir), data_root=str(data), device="cpu",
                                                train_per_task=2, val_size=6, eval_size=4, batch_size=4, max_steps=3,
                                                lr=0.01, window=2, max_nonfinite_steps=2,
                                                method_options={"selector_heads": 4, "selector_ffn_dim": 32})))
    with pytest.raises(Exception, match="training stopped at step 2"):
        train(TrainConfig(out=str(tmp_path / "strict"), **{**values, "max_nonfinite_steps": 1}))
    run = train(TrainConfig(out=str(tmp_path / "lenient"), **values))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False, True, False] and rows[1]["loss"] is None
    assert (run / COMPLETE_FILE).is_file()


def test_json_never_holds_nan_and_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": float("nan"), "y": [1.0, float("inf")], "z": {"w": -float("inf")}})
        write_text(tmp_path / "b.txt", "hi")
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "a.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"x": None, "y": [1.0, None], "z": {"w": None}}
    for name in ("a.json", "b.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


def test_written_files_get_the_mode_of_a_plain_open(tiny, tmp_path):
    """safetensors writes 0600 through its own temporary file (so does save_pretrained, with it): every file comlora
    writes, or has PEFT and transformers write into a run or an export, gets 0666 less the umask, as a plain open()
    gives it, and every folder 0777 less the umask."""
    from conftest import train_args as short_run_args
    from safetensors.torch import save_file as library_save_file

    from comlora.storage import write_safetensors

    model_dir, data, _ = tiny
    library_save_file({"x": torch.zeros(2)}, str(tmp_path / "library.safetensors"))
    assert (tmp_path / "library.safetensors").stat().st_mode & 0o777 == 0o600     # what is being fixed
    old = os.umask(0o027)
    try:
        write_safetensors(tmp_path / "ours.safetensors", {"x": torch.zeros(2)})
        run = tmp_path / "lora-run"
        main(short_run_args(model_dir, data, run, "--method", "lora", "--save-every", "2"))
        main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")])
        main(["export", str(run), "--out", str(tmp_path / "adapter")])
    finally:
        os.umask(old)
    assert (tmp_path / "ours.safetensors").stat().st_mode & 0o777 == 0o640
    written = [p for folder in (run, tmp_path / "merged", tmp_path / "adapter") for p in [folder, *folder.rglob("*")]]
    assert {p.relative_to(tmp_path).as_posix() for p in written} >= {
        "lora-run/state/adapter_model.safetensors", "lora-run/adapter/adapter_model.safetensors",
        "merged/model.safetensors", "adapter/adapter_model.safetensors"}
    wrong = [f"{p}: {oct(p.stat().st_mode & 0o777)}" for p in written
             if p.stat().st_mode & 0o777 != (0o750 if p.is_dir() else 0o640)]
    assert not wrong, wrong


# ---- refusals: one line, exit code 2 ----------------------------------------------------------------
def test_refusals_are_one_line_with_exit_code_2_and_debug_shows_the_traceback(tiny, tmp_path, capsys):
    model_dir, data, reference = tiny
    (tmp_path / "a-file").write_text("x")
    assert "--out" in cli_error(train_args(model_dir, data, tmp_path / "a-file"), capsys)
    assert "is a file" in cli_error(train_args(model_dir, data, tmp_path / "a-file"), capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "is not empty" in cli_error(["export", str(reference), "--out", str(tmp_path / "full")], capsys)
    assert "is a file" in cli_error(["export", str(reference), "--out", str(tmp_path / "a-file")], capsys)
    message = cli_error(["eval", "--run", str(reference), "--components", "best", "--data-root", str(data)], capsys)
    assert "--components must be all, winner or a component index" in message
    assert "component must be an integer in 0..1" in cli_error(
        ["eval", "--run", str(reference), "--components", "5", "--data-root", str(data), "--limit", "1"], capsys)
    with pytest.raises(SystemExit):
        main(["--debug", "export", str(reference), "--out", str(tmp_path / "full")])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")
    assert (tmp_path / "full" / "x").read_text() == "x" and (tmp_path / "a-file").read_text() == "x"

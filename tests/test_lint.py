"""The code passes ``ruff check`` with the rules configured in pyproject.toml (line length 120)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff_command() -> list[str]:
    """The venv's ruff (installed by the dev extra), else one on PATH."""
    beside = Path(sys.executable).with_name("ruff")
    if beside.exists():
        return [str(beside)]
    if shutil.which("ruff"):
        return [shutil.which("ruff")]
    pytest.fail("ruff is not installed: it is part of the dev extra (make setup installs it)")


def test_ruff_check_passes_on_src_and_tests():
    done = subprocess.run([*ruff_command(), "check", "--no-cache", "src", "tests", "bench", "examples"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]

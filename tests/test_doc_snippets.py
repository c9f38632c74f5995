"""The Python of docs/*.md, run as written: every fenced ```python block and every ``python -c "..."`` command, each
in a fresh interpreter on this source tree. (README.md's runnable example has its own test, test_readme_trainer.py.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))


def python_snippets(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block and every `python -c "CODE"` command in a Markdown page."""
    found = [(m.start(1), m.group(1)) for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]
    found += [(m.start(1), m.group(1)) for m in re.finditer(r'python3? -c "([^"]+)"', text)]
    return sorted((text.count("\n", 0, start) + 1, code) for start, code in found)


SNIPPETS = [pytest.param(code, id=f"{page.name}:{line}") for page in PAGES
            for line, code in python_snippets(page.read_text())]


def test_the_docs_hold_python_to_run():
    assert any(param.id.startswith("export.md:") for param in SNIPPETS)


def test_snippets_are_found_in_blocks_and_in_commands():
    page = 'run:\n```python\nx = 1\nprint(x)\n```\nand `$(python -c "import os; print(os.sep)")`.\n```bash\nls\n```\n'
    assert python_snippets(page) == [(3, "x = 1\nprint(x)\n"), (6, "import os; print(os.sep)")]


@pytest.mark.parametrize("code", SNIPPETS)
def test_doc_snippet_runs_as_written(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

"""The study report's templates (study/prose.py) and its contract for a new section: one function returning a
dataclass whose fields fill one template, and one entry of report.SECTIONS."""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from comlora.study import report
from comlora.study.prose import block, fill, render
from comlora.study.sections import runs


def test_a_wrapped_template_joins_its_continuation_lines():
    template = block("""
# Title

A sentence that goes on
    over two lines, and $name.
- an item
""")
    assert template.template == "# Title\n\nA sentence that goes on over two lines, and $name.\n- an item"
    assert fill(template, name="X") == "# Title\n\nA sentence that goes on over two lines, and X.\n- an item"


def test_an_empty_placeholder_line_leaves_no_gap():
    template = block("""
First line.
$soft

$paragraph

Last line with $optional
""")
    assert fill(template, soft="", paragraph="", optional="") == "First line.\n\nLast line with"
    assert fill(template, soft="Second line.", paragraph="A paragraph.", optional="more.") == \
        "First line.\nSecond line.\n\nA paragraph.\n\nLast line with more."
    with pytest.raises(KeyError, match="optional"):
        fill(template, soft="", paragraph="")                  # a value the template needs is missing


def test_a_new_section_is_one_function_and_one_template(tmp_path, monkeypatch):
    """What the Study II sections will do: a dataclass result filling its template, placed by SECTIONS."""
    extra = block("""
## Study II: a new section

$experiments experiments planned.
""")

    @dataclass
    class NewSection:
        experiments: int
        template: ClassVar = extra

    def new_section(page):
        return NewSection(len(page.study.experiments))

    assert render(NewSection(3)) == "## Study II: a new section\n\n3 experiments planned."
    at = report.SECTIONS.index(runs.run_list)                       # Study I's last section: its run list
    monkeypatch.setattr(report, "SECTIONS", [*report.SECTIONS[:at], new_section, *report.SECTIONS[at:]])
    page = report.write_report("experiments/study", tmp_path / "none", tmp_path / "page.md", tmp_path / "fig")
    experiments = len(list(Path("experiments/study").glob("*.yaml"))) - 1                # less base.yaml
    assert page.read_text().endswith(f"\n\n## Study II: a new section\n\n{experiments} experiments planned.\n\n"
                                     "## Recorded runs\n\nNone yet.\n")

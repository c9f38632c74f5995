"""What each feature needs under a data root, and what is there: ``comlora check-data``.

The layout (docs/data.md): ``commonsense/<task>/test.json`` (+ optional ``train.json``) for the 8 LLM-Adapters
tasks, ``mmlu/dev/<subject>_dev.csv`` and ``mmlu/test/<subject>_test.csv`` for the 57 MMLU subjects, and the ConvAI2
file ``CONVAI2_FILE``. Present files are read with the loaders the commands use, so a file that passes here is
one they accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from comlora.data.commonsense import COMMONSENSE_TASKS
from comlora.data.convai2 import CONVAI2_FILE, load_convai2
from comlora.data.items import load_items
from comlora.data.mmlu import SUBJECT_CATEGORIES, load_mmlu

LLM_ADAPTERS_FIELDS = ("instruction", "input", "output", "answer")
MMLU_SUBJECTS = sorted(SUBJECT_CATEGORIES)


@dataclass
class DatasetReport:
    """One dataset under the root: its required files found or missing, files present but unreadable."""

    name: str
    used_by: list[str]                                     # the commands that read it
    required: int = 0                                      # how many files the dataset must have
    found: list[str] = field(default_factory=list)         # paths relative to the root, optional files included
    missing: list[str] = field(default_factory=list)       # required files that are absent
    problems: list[str] = field(default_factory=list)      # present files the loaders refuse, each naming its file
    notes: list[str] = field(default_factory=list)         # absent optional files and what that changes

    @property
    def complete(self) -> bool:
        return not self.missing and not self.problems


@dataclass
class DataRootReport:
    root: Path
    datasets: list[DatasetReport]

    @property
    def complete(self) -> bool:
        return all(d.complete for d in self.datasets)

    @property
    def incomplete(self) -> list[DatasetReport]:
        return [d for d in self.datasets if not d.complete]


def _read_problem(path: Path, read) -> str | None:
    """None when ``read(path)`` accepts the file, else its message (which names the file)."""
    try:
        read(path)
    except (ValueError, OSError) as err:   # a UnicodeDecodeError (a ValueError) does not name the file
        return str(err) if str(path) in str(err) else f"{path}: {err}"
    return None


def _llm_adapters_file(path: Path, require_answer: bool) -> None:
    """The checks of ``load_items`` on every item, plus the four LLM-Adapters fields on the first one."""
    items = load_items(path, require_answer=require_answer)
    absent = [key for key in LLM_ADAPTERS_FIELDS if key not in items[0]]
    if absent:
        raise ValueError(f"{path}: item 0 lacks the LLM-Adapters field(s) {', '.join(absent)} "
                         f"(expected {', '.join(LLM_ADAPTERS_FIELDS)})")


def check_commonsense(root: Path) -> DatasetReport:
    """test.json of every task (required; the evaluation subset and, without train.json, the training items) and
    train.json (optional; training candidates where present), as ``build_commonsense_mini`` reads them."""
    report = DatasetReport("commonsense", ["comlora train (--data commonsense-mini, the default)",
                                           "comlora eval --task commonsense", "comlora demo", "comlora study"],
                           required=len(COMMONSENSE_TASKS))
    no_train = []
    for task in COMMONSENSE_TASKS:
        for split, is_required in (("test", True), ("train", False)):
            relative = f"commonsense/{task}/{split}.json"
            path = root / relative
            if not path.is_file():
                if is_required:
                    report.missing.append(relative)
                else:
                    no_train.append(task)
                continue
            report.found.append(relative)
            problem = _read_problem(path, lambda p, split=split: _llm_adapters_file(p, require_answer=split == "test"))
            if problem:
                report.problems.append(problem)
    if no_train:
        report.notes.append(f"no train.json for {', '.join(no_train)}: their training and validation candidates "
                            "are the test.json items outside the evaluation subset")
    return report


def check_mmlu(root: Path, split: str) -> DatasetReport:
    """``mmlu/<split>/<subject>_<split>.csv`` of all 57 subjects, each parsed as ``load_mmlu`` does."""
    used_by = {"test": ["comlora eval --task mmlu", "comlora train --data mmlu:test"],
               "dev": ["comlora eval --task mmlu --shots K (K > 0)", "comlora train --data mmlu (mmlu:dev)"]}[split]
    report = DatasetReport(f"mmlu-{split}", used_by, required=len(MMLU_SUBJECTS))
    for subject in MMLU_SUBJECTS:
        relative = f"mmlu/{split}/{subject}_{split}.csv"
        if not (root / relative).is_file():
            report.missing.append(relative)
            continue
        report.found.append(relative)
        problem = _read_problem(root / relative, lambda _, subject=subject: load_mmlu(root / "mmlu", split, [subject]))
        if problem:
            report.problems.append(problem)
    return report


def check_convai2(root: Path) -> DatasetReport:
    """The ConvAI2 validation file, parsed as ``load_convai2`` does."""
    report = DatasetReport("convai2", ["comlora eval --task convai2", "comlora train --data convai2"], required=1)
    path = root / CONVAI2_FILE
    if not path.is_file():
        report.missing.append(CONVAI2_FILE)
        return report
    report.found.append(CONVAI2_FILE)
    problem = _read_problem(path, load_convai2)
    if problem:
        report.problems.append(problem)
    return report


def check_data_root(root: str | Path) -> DataRootReport:
    """Which files each dataset needs under ``root``, which are there, and which of those the loaders refuse."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} is not a folder")
    return DataRootReport(root, [check_commonsense(root), check_mmlu(root, "test"), check_mmlu(root, "dev"),
                                 check_convai2(root)])


def _summary(dataset: DatasetReport) -> str:
    present = dataset.required - len(dataset.missing)
    if dataset.complete:
        status = "ok"
    elif present == 0 and not dataset.problems:
        status = "MISSING"
    else:
        status = "INCOMPLETE"
    return f"{dataset.name:<12} {status:<10} {present} of {dataset.required} required files"


def format_report(report: DataRootReport, max_listed: int = 10) -> str:
    """The report as text: one line per dataset, then its missing files and problems (at most ``max_listed`` of
    each, then a count), its notes, and the commands an incomplete dataset affects."""
    lines = [f"data root: {report.root}"]
    for dataset in report.datasets:
        lines.append(_summary(dataset))
        for label, entries in (("missing", dataset.missing), ("problem", dataset.problems)):
            lines += [f"  {label}: {entry}" for entry in entries[:max_listed]]
            if len(entries) > max_listed:
                lines.append(f"  ... and {len(entries) - max_listed} more {label} entries")
        lines += [f"  note: {note}" for note in dataset.notes]
        if not dataset.complete:
            lines.append(f"  affects: {'; '.join(dataset.used_by)}")
    if report.complete:
        lines.append("every dataset is complete")
    else:
        lines.append(f"incomplete: {', '.join(d.name for d in report.incomplete)} "
                     "(docs/data.md says where each dataset comes from)")
    return "\n".join(lines)

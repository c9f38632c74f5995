"""MMLU (Hendrycks et al.): CSV loading, its 57 subjects and their categories, the lm-evaluation-harness prompt,
and training items in the LLM-Adapters format (docs/evaluation.md)."""

from __future__ import annotations

import csv
from pathlib import Path

LETTERS = ("A", "B", "C", "D")
HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
SPLITS = ("dev", "test")
ANSWER_PREFIX = "the correct answer is"  # LLM-Adapters' output form: "the correct answer is B"

_CATEGORY_MEMBERS = {  # the grouping of Hendrycks et al.'s categories.py (subcategory -> category)
    "STEM": ["abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
             "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
             "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
             "high_school_computer_science", "high_school_mathematics", "high_school_physics",
             "high_school_statistics", "machine_learning"],
    "humanities": ["formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"],
    "social sciences": ["econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"],
    "other": ["anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
              "professional_medicine", "virology"],
}
SUBJECT_CATEGORIES = {subject: category for category, subjects in _CATEGORY_MEMBERS.items() for subject in subjects}
CATEGORIES = list(_CATEGORY_MEMBERS)
UNCATEGORIZED = "uncategorized"  # a subject outside the 57 (MMLU-format data of your own)


# -----------------------------------------------------------------------------
# loading

def _split_folder(root: str | Path, split: str) -> Path:
    """The folder of ``<subject>_<split>.csv`` files: ``root/mmlu/<split>``, ``root/<split>`` or ``root`` itself."""
    if split not in SPLITS:
        raise ValueError(f"unknown MMLU split {split!r}; choose one of {SPLITS}")
    root = Path(root)
    for folder in (root / "mmlu" / split, root / split, root):
        if folder.is_dir() and any(folder.glob(f"*_{split}.csv")):
            return folder
    raise FileNotFoundError(f"no MMLU {split} files (*_{split}.csv) in {root}, {root / split} or "
                            f"{root / 'mmlu' / split}")


def _read_csv(path: Path, subject: str, limit: int | None) -> list[dict]:
    """Rows of one MMLU CSV: with the header ``question,choice0..choice3,answer`` and answers 0-3, or as Hendrycks et
    al.'s release ships them (no header, answers A-D). Every problem names the file and the line where the row
    starts."""
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, strict=True)
        answers = ("0", "1", "2", "3")
        pending = None                                   # a first row that is already data (no header)
        try:
            first = next(reader, None)
        except csv.Error as err:
            raise ValueError(f"{path}:1: malformed CSV ({err})") from err
        if first is not None and first != HEADER:
            if len(first) != len(HEADER) or first[5].strip() not in LETTERS:
                raise ValueError(f"{path}:1: expected the header {','.join(HEADER)} (answers 0-3), or "
                                 f"Hendrycks et al.'s rows without a header (question, 4 choices, answer A-D), "
                                 f"got {first}")
            answers, pending = LETTERS, (1, first)
        while limit is None or len(items) < limit:
            line = reader.line_num + 1
            try:
                line, row = pending if pending else (line, next(reader))
                pending = None
            except StopIteration:
                break
            except csv.Error as err:
                raise ValueError(f"{path}:{line}: malformed CSV ({err})") from err
            if len(row) != len(HEADER):
                raise ValueError(f"{path}:{line}: expected {len(HEADER)} fields "
                                 f"(question, 4 choices, answer), got {len(row)}")
            if row[5].strip() not in answers:
                raise ValueError(f"{path}:{line}: field 'answer' must be {', '.join(answers[:3])} or {answers[3]}, "
                                 f"got {row[5]!r}")
            items.append({"subject": subject, "index": len(items), "question": row[0], "choices": row[1:5],
                          "answer": answers.index(row[5].strip())})
    return items


def load_mmlu(root: str | Path, split: str = "test", subjects: list[str] | None = None,
              limit: int | None = None) -> list[dict]:
    """Items {subject, index, question, choices[4], answer 0..3} of every (or the named) subject, subjects
    in alphabetical order, rows in file order; ``limit`` keeps the first ``limit`` rows of each subject."""
    folder = _split_folder(root, split)
    if subjects is None:
        files = sorted(folder.glob(f"*_{split}.csv"))
    else:
        files = [folder / f"{subject}_{split}.csv" for subject in subjects]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"no MMLU file {', '.join(missing)}")
    items = []
    for path in files:
        items.extend(_read_csv(path, path.name[: -len(f"_{split}.csv")], limit))
    return items


# -----------------------------------------------------------------------------
# prompts

def _question_block(item: dict) -> str:
    """The question and its lettered choices, without the 'Answer:' line."""
    return item["question"].strip() + "".join(f"\n{letter}. {choice}"
                                              for letter, choice in zip(LETTERS, item["choices"]))


def _header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_prompt(item: dict, shots: list[dict] = ()) -> str:
    """The lm-evaluation-harness MMLU prompt: header, each shot answered ('Answer: B'), then the question
    ending in 'Answer:' (the model's continuation " B" is what is scored)."""
    solved = "".join(f"{_question_block(shot)}\nAnswer: {LETTERS[shot['answer']]}\n\n" for shot in shots)
    return _header(item["subject"]) + solved + _question_block(item) + "\nAnswer:"


def mmlu_training_item(item: dict) -> dict:
    """One MMLU item in the LLM-Adapters format: instruction = the zero-shot prompt without its final
    '\\nAnswer:' line, output = 'the correct answer is B', answer = 'B'."""
    letter = LETTERS[item["answer"]]
    return {"instruction": _header(item["subject"]) + _question_block(item), "input": "",
            "output": f"{ANSWER_PREFIX} {letter}", "answer": letter, "subject": item["subject"]}


def mmlu_training_items(root_or_folder: str | Path, split: str = "dev", subjects: list[str] | None = None,
                        limit: int | None = None) -> list[dict]:
    """``load_mmlu`` items as LLM-Adapters training items (see ``mmlu_training_item``)."""
    return [mmlu_training_item(item) for item in load_mmlu(root_or_folder, split, subjects, limit)]

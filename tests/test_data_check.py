"""comlora.data.check: what a data root holds, on tiny fake roots (milliseconds) and on the real root if present."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import WITH_TRAIN, write_commonsense_root

from comlora.data.check import MMLU_SUBJECTS, check_data_root, format_report
from comlora.data.commonsense import COMMONSENSE_TASKS
from comlora.data.convai2 import CONVAI2_FILE
from comlora.data.items import data_root
from comlora.data.mmlu import HEADER

FIXTURES = Path(__file__).parent / "fixtures"


def write_complete_root(root: Path) -> Path:
    """Every dataset in the documented layout: 8 commonsense tasks, 57 MMLU subjects x dev/test, ConvAI2."""
    write_commonsense_root(root, test_items=3, train_items=2)
    for split in ("dev", "test"):
        folder = root / "mmlu" / split
        folder.mkdir(parents=True)
        for subject in MMLU_SUBJECTS:
            (folder / f"{subject}_{split}.csv").write_text(",".join(HEADER) + f"\nA {subject} question?,w,x,y,z,2\n")
    (root / CONVAI2_FILE).parent.mkdir(parents=True)
    shutil.copy(FIXTURES / "convai2" / "dialogues.txt", root / CONVAI2_FILE)
    return root


@pytest.fixture
def complete_root(tmp_path):
    return write_complete_root(tmp_path / "data")


def by_name(report):
    return {d.name: d for d in report.datasets}


def test_a_complete_root_has_no_problem(complete_root):
    report = check_data_root(complete_root)
    assert report.complete and report.incomplete == []
    datasets = by_name(report)
    assert list(datasets) == ["commonsense", "mmlu-test", "mmlu-dev", "convai2"]
    for d in report.datasets:
        assert d.missing == [] and d.problems == [], d.name
    assert len(MMLU_SUBJECTS) == 57
    assert len(datasets["mmlu-test"].found) == 57 and len(datasets["mmlu-dev"].found) == 57
    assert datasets["convai2"].found == [CONVAI2_FILE]
    assert sorted(datasets["commonsense"].found) == sorted(
        [f"commonsense/{t}/test.json" for t in COMMONSENSE_TASKS] + [f"commonsense/{t}/train.json" for t in WITH_TRAIN])
    # train.json is optional: its absence is a note naming the tasks, not a missing file
    assert len(datasets["commonsense"].notes) == 1
    for task in set(COMMONSENSE_TASKS) - WITH_TRAIN:
        assert task in datasets["commonsense"].notes[0]
    text = format_report(report)
    assert "every dataset is complete" in text and "MISSING" not in text and "affects" not in text
    assert "mmlu-test    ok         57 of 57 required files" in text


def test_a_missing_task_file_is_named_with_the_commands_it_affects(complete_root):
    (complete_root / "commonsense" / "piqa" / "test.json").unlink()
    (complete_root / "commonsense" / "boolq" / "train.json").unlink()          # optional: a note, not missing
    report = check_data_root(complete_root)
    commonsense = by_name(report)["commonsense"]
    assert not report.complete and [d.name for d in report.incomplete] == ["commonsense"]
    assert commonsense.missing == ["commonsense/piqa/test.json"] and commonsense.problems == []
    assert "boolq" in commonsense.notes[0]
    text = format_report(report)
    assert "commonsense  INCOMPLETE 7 of 8 required files" in text
    assert "  missing: commonsense/piqa/test.json" in text
    assert "affects: comlora train (--data commonsense-mini, the default); comlora eval --task commonsense" in text
    assert "incomplete: commonsense" in text


def test_a_missing_mmlu_subject_is_named(complete_root):
    (complete_root / "mmlu" / "test" / "virology_test.csv").unlink()
    report = check_data_root(complete_root)
    assert [d.name for d in report.incomplete] == ["mmlu-test"]
    assert by_name(report)["mmlu-test"].missing == ["mmlu/test/virology_test.csv"]
    assert by_name(report)["mmlu-dev"].complete
    text = format_report(report)
    assert "mmlu-test    INCOMPLETE 56 of 57 required files" in text and "missing: mmlu/test/virology_test.csv" in text


def test_an_absent_dataset_is_missing_and_long_lists_are_cut(complete_root):
    shutil.rmtree(complete_root / "mmlu" / "dev")
    (complete_root / CONVAI2_FILE).unlink()
    report = check_data_root(complete_root)
    assert [d.name for d in report.incomplete] == ["mmlu-dev", "convai2"]
    assert len(by_name(report)["mmlu-dev"].missing) == 57
    text = format_report(report, max_listed=3)
    assert "mmlu-dev     MISSING    0 of 57 required files" in text
    assert text.count("  missing: mmlu/dev/") == 3 and "... and 54 more missing entries" in text
    assert f"convai2      MISSING    0 of 1 required files\n  missing: {CONVAI2_FILE}\n" \
           "  affects: comlora eval --task convai2; comlora train --data convai2" in text


@pytest.mark.parametrize("content, message", [
    ("[{\"instruction\": \"q\", ", "not valid JSON"),                        # cut short
    ("{\"instruction\": \"q\"}", "expected a JSON list"),
    ("[]", "holds no item"),
    (json.dumps([{"instruction": "q", "input": "", "output": "the correct answer is true"}]), "no field 'answer'"),
    (json.dumps([{"instruction": "q", "output": "o", "answer": "true"}]), "lacks the LLM-Adapters field(s) input"),
    (b"[\"\xff\"]", "codec can't decode"),
])
def test_a_corrupt_json_file_is_named(complete_root, content, message):
    path = complete_root / "commonsense" / "winogrande" / "test.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    report = check_data_root(complete_root)
    commonsense = by_name(report)["commonsense"]
    assert commonsense.missing == [] and len(commonsense.problems) == 1
    assert str(path) in commonsense.problems[0] and message in commonsense.problems[0]
    assert f"  problem: {path}" in format_report(report)


def test_corrupt_mmlu_and_convai2_files_are_named(complete_root):
    bad_csv = complete_root / "mmlu" / "dev" / "anatomy_dev.csv"
    bad_csv.write_text("question,a,b\nq,1,2\n")
    shutil.copy(FIXTURES / "convai2_malformed" / "no_tab.txt", complete_root / CONVAI2_FILE)
    report = check_data_root(complete_root)
    assert [d.name for d in report.incomplete] == ["mmlu-dev", "convai2"]
    (dev_problem,), (convai2_problem,) = by_name(report)["mmlu-dev"].problems, by_name(report)["convai2"].problems
    assert dev_problem.startswith(f"{bad_csv}:1: expected the header")
    assert convai2_problem.startswith(f"{complete_root / CONVAI2_FILE}:") and "no response found" in convai2_problem


def test_a_root_that_is_not_a_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        check_data_root(tmp_path / "nowhere")


def test_the_real_data_root():
    try:
        root = data_root()
    except FileNotFoundError:
        pytest.skip("no shared data root (set COMLORA_DATA)")
    report = check_data_root(root)
    assert report.complete, format_report(report)
    found = by_name(report)["commonsense"].found
    assert {f"commonsense/{t}/test.json" for t in COMMONSENSE_TASKS} <= set(found)


def test_check_data_command_exits_1_naming_what_is_missing(complete_root, capsys):
    from comlora.cli import main

    main(["check-data", "--data-root", str(complete_root)])
    assert "every dataset is complete" in capsys.readouterr().out
    (complete_root / "convai2" / "valid_self_original_no_cands.txt").unlink()
    with pytest.raises(SystemExit) as stop:
        main(["check-data", "--data-root", str(complete_root)])
    out = capsys.readouterr().out
    assert stop.value.code == 1
    assert "missing: convai2/valid_self_original_no_cands.txt" in out and "comlora eval --task convai2" in out

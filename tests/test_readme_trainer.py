"""The README's "From your own Trainer" and "With TRL" examples, run as written.

Only the two lines marked ``# your model`` and ``# its tokenizer`` are replaced (nothing can be downloaded here):
by a tiny random Llama and a byte-level tokenizer (for TRL's chat data, with a small chat template). Everything
else, data preparation included, runs verbatim.
"""

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
SECTIONS = {
    "### From your own Trainer": {"# your model": "model = make_tiny_llama(vocab=TINY_TEXT_VOCAB)",
                                  "# its tokenizer": "tokenizer = make_tokenizer()"},
    "### With TRL": {"# your model": "model = make_tiny_llama(vocab=TINY_TEXT_VOCAB)",
                     "# its tokenizer": "tokenizer = make_chat_tokenizer()"},
}
# what the Instruct model's own template does in outline: turns in order, the assistant's prompt opened on request
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def readme_example(heading: str) -> str:
    substitutes = SECTIONS[heading]
    section = README.read_text().split(heading + "\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lines = []
    for line in code.splitlines():
        marker = next((m for m in substitutes if line.rstrip().endswith(m)), None)
        lines.append(substitutes[marker] if marker else line)
    assert sum(line in substitutes.values() for line in lines) == 2, "the README lost a marked line"
    return "\n".join(lines)


def make_chat_tokenizer():
    from conftest import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def run_readme_example(heading: str, tmp_path, monkeypatch) -> None:
    from conftest import TINY_TEXT_VOCAB, make_tiny_llama, make_tokenizer

    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(heading), str(README), "exec"),
         {"__name__": "readme", "make_tiny_llama": make_tiny_llama, "make_tokenizer": make_tokenizer,
          "make_chat_tokenizer": make_chat_tokenizer, "TINY_TEXT_VOCAB": TINY_TEXT_VOCAB})


def check_winner_folder(winner: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors", "winner.json", "comlora_model.safetensors"):
        assert (winner / name).is_file(), name
    assert json.loads((winner / "winner.json").read_text())["num_samples"] == 4


def test_readme_trainer_example_runs_as_written(tmp_path, monkeypatch, capsys):
    run_readme_example("### From your own Trainer", tmp_path, monkeypatch)
    assert "eval_similarity_0" in capsys.readouterr().out
    check_winner_folder(tmp_path / "runs" / "trainer" / "winner")


def test_readme_trl_example_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("trl")
    run_readme_example("### With TRL", tmp_path, monkeypatch)
    assert "eval_similarity_0" in capsys.readouterr().out
    check_winner_folder(tmp_path / "runs" / "sft" / "winner")


@pytest.mark.parametrize("heading, marker", [(h, m) for h in SECTIONS for m in SECTIONS[h]])
def test_the_substituted_lines_are_only_model_and_tokenizer_loading(heading, marker):
    section = README.read_text().split(heading + "\n", 1)[1]
    line = next(l for l in section.splitlines() if l.rstrip().endswith(marker))
    assert "from_pretrained(" in line

"""The README's "From your own Trainer" example, run as written.

Only the two lines marked ``# your model`` and ``# its tokenizer`` are replaced (nothing can be downloaded here):
by a tiny random Llama and a byte-level tokenizer. Everything else, data preparation included, runs verbatim.
"""

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
SUBSTITUTES = {"# your model": "model = make_tiny_llama(vocab=TINY_TEXT_VOCAB)",
               "# its tokenizer": "tokenizer = make_tokenizer()"}


def readme_trainer_example() -> str:
    section = README.read_text().split("### From your own Trainer", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lines = []
    for line in code.splitlines():
        marker = next((m for m in SUBSTITUTES if line.rstrip().endswith(m)), None)
        lines.append(SUBSTITUTES[marker] if marker else line)
    assert sum(line in SUBSTITUTES.values() for line in lines) == 2, "the README lost a marked line"
    return "\n".join(lines)


def test_readme_trainer_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from conftest import TINY_TEXT_VOCAB, make_tiny_llama, make_tokenizer

    monkeypatch.chdir(tmp_path)
    exec(compile(readme_trainer_example(), str(README), "exec"),
         {"__name__": "readme", "make_tiny_llama": make_tiny_llama, "make_tokenizer": make_tokenizer,
          "TINY_TEXT_VOCAB": TINY_TEXT_VOCAB})
    assert "eval_similarity_0" in capsys.readouterr().out
    winner = tmp_path / "runs" / "trainer" / "winner"
    for name in ("adapter_config.json", "adapter_model.safetensors", "winner.json", "comlora_model.safetensors"):
        assert (winner / name).is_file(), name
    assert json.loads((winner / "winner.json").read_text())["num_samples"] == 4


@pytest.mark.parametrize("marker", list(SUBSTITUTES))
def test_the_substituted_lines_are_only_model_and_tokenizer_loading(marker):
    section = README.read_text().split("### From your own Trainer", 1)[1]
    line = next(l for l in section.splitlines() if l.rstrip().endswith(marker))
    assert "from_pretrained(" in line

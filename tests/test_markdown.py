"""The one Markdown table writer (comlora.markdown) and its mean ± std cells, against tables written by hand."""

import pytest

from comlora import markdown


def test_table_by_hand():
    text = markdown.table(["model", "BoolQ", "avg"], [["base", "50.0", 50], ["lora", 61.5, "61.5"]])
    assert text == ("| model | BoolQ | avg |\n"
                    "|---|---|---|\n"
                    "| base | 50.0 | 50 |\n"
                    "| lora | 61.5 | 61.5 |")
    assert markdown.table(["a"], []) == "| a |\n|---|"


def test_a_row_with_the_wrong_number_of_cells_is_named():
    with pytest.raises(ValueError, match=r"a table row has 1 cells for 2 columns \(\['a', 'b'\]\): \['x'\]"):
        markdown.table(["a", "b"], [["x"]])


def test_mean_std_by_hand():
    assert markdown.mean_std([]) == "–"
    assert markdown.mean_std([35.25]) == "35.2"                       # one value: as it is (35.25 rounds half-even)
    assert markdown.mean_std([1.0, 2.0, 3.0]) == "2.0 ± 1.0"          # sample std: sqrt(((1-2)^2 + (3-2)^2) / 2)
    assert markdown.mean_std([10.0, 14.0], digits=2) == "12.00 ± 2.83"  # sqrt(8) = 2.828...

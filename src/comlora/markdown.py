"""The Markdown every comlora table is written in: evaluation results (``comlora eval``), ``comlora compare`` and
the study report (docs/reproduction.md)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A Markdown table: the header row, the ``|---|`` separator and one line per row, each cell written with str();
    the lines are joined with newlines and the last has none. A row with another number of cells than the header is
    a ValueError."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells for {len(header)} columns ({list(header)}): "
                             f"{list(row)}")
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def mean_std(values: Sequence[float], digits: int = 1) -> str:
    """One value as it is, several as mean ± sample standard deviation (n - 1), ``digits`` decimals; none: '–'."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

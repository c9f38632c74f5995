"""How the study report writes a number in a table cell or a sentence."""

from __future__ import annotations


def signed(value: float, digits: int = 1) -> str:
    """The value with its sign, a value that rounds to zero as +0.0 (not -0.0)."""
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def p_text(p: float) -> str:
    """A p value with four decimals, or '< 0.0001'."""
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def seeds_text(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds)) + (" (one seed)" if len(seeds) == 1 else "")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def paper_cells(row: dict) -> list[str]:
    """The paper's task values and average, in italics."""
    return [f"*{v:.2f}*" for v in row["tasks"]] + [f"*{row['average']:.2f}*"]

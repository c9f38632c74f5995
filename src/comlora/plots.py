"""The paper's training figures from a run's metrics.jsonl: Figure 2 (per-component training loss)
and Figure 3 (how often each component had the lowest loss, per window of steps)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run: str | Path) -> list[dict]:
    """The lines of RUN/metrics.jsonl, less the steps skipped for a non-finite loss (``"skipped": true``); a line
    that is not JSON is a ValueError naming the file and the line."""
    path = Path(run) / "metrics.jsonl"
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            if not row.get("skipped"):
                rows.append(row)
    return rows


def smooth(values: list[float], span: int) -> list[float]:
    """Trailing moving average over ``span`` steps."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - span + 1): i + 1]
        out.append(sum(window) / len(window))
    return out


def plot_loss_curves(runs: dict[str, str | Path], out: str | Path, span: int = 5) -> Path:
    """Figure 2: each ComLoRA component's training loss, and the LM loss of any other run given. After an
    early decision (decide_at) only the decided component trains: its curve goes on with the run's LM loss."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run in runs.items():
        rows = read_metrics(run)
        steps = [r["step"] for r in rows]
        if rows and "component_loss" in rows[0]:
            competing = [r for r in rows if "component_loss" in r]
            decision_file = Path(run) / "decision.json"
            decision = json.loads(decision_file.read_text()) if decision_file.is_file() else None
            for k in range(len(rows[0]["component_loss"])):
                values = [r["component_loss"][k] for r in competing]
                k_steps = [r["step"] for r in competing]
                if decision is not None and decision["winner"] == k:
                    values += [r["lm"] for r in rows if "component_loss" not in r]
                    k_steps += [r["step"] for r in rows if "component_loss" not in r]
                ax.plot(k_steps, smooth(values, span), label=f"{label} component {k}")
            if decision is not None:
                ax.axvline(decision["decided_at_step"] + 0.5, color="grey", linestyle=":", label="early decision")
        else:
            ax.plot(steps, smooth([r["lm"] for r in rows], span), label=label, linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (moving average over {span} steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def lowest_loss_shares(rows: list[dict], window: int) -> list[list[float]]:
    """Per window of ``window`` steps, the fraction of its steps at which each component had the lowest loss."""
    rows = [r for r in rows if "component_loss" in r]        # steps before an early decision
    k = len(rows[0]["component_loss"])
    shares = []
    for start in range(0, len(rows), window):
        chunk = rows[start:start + window]
        counts = [sum(r["lowest_loss_component"] == c for r in chunk) for c in range(k)]
        shares.append([c / len(chunk) for c in counts])
    return shares


def plot_lowest_loss_share(run: str | Path, out: str | Path, window: int = 50) -> Path:
    """Figure 3: stacked bars, one per window of steps."""
    rows = [r for r in read_metrics(run) if "component_loss" in r]
    shares = lowest_loss_shares(rows, window)
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(shares)
    x = [f"{i * window + 1}-{min((i + 1) * window, len(rows))}" for i in range(len(shares))]
    for c in range(len(shares[0])):
        heights = [s[c] for s in shares]
        ax.bar(x, heights, bottom=bottom, label=f"component {c}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("steps")
    ax.set_ylabel("share of steps with the lowest loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def plot_run(run: str | Path, window: int = 50, into: str | Path | None = None) -> list[Path]:
    """Draw the figures a run's metrics support into the run directory (or the folder ``into``)."""
    run = Path(run)
    into = Path(into) if into is not None else run
    rows = read_metrics(run)
    if not rows:
        return []
    paths = [plot_loss_curves({run.name: run}, into / "loss_curves.png")]
    if "component_loss" in rows[0]:
        paths.append(plot_lowest_loss_share(run, into / "lowest_loss_share.png", window))
    return paths

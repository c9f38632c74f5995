"""``comlora compare``: runs side by side in the paper's Table 3 layout (method, Params % L/S, one column
per task, average, inference cost), mean and standard deviation over runs that share a configuration."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from comlora import markdown
from comlora.evaluation.results import parse_component_label
from comlora.methods.registry import get_method
from comlora.storage import read_json_object
from comlora.training.config import load_yaml

GROUP_KEYS = ("method", "r", "num_components")


def run_summary(run: str | Path) -> dict:
    """Configuration, parameter counts and commonsense accuracies of one evaluated run."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (config.yaml is missing)")
    config = load_yaml(run / "config.yaml")
    if not (run / "parameters.json").is_file():
        raise FileNotFoundError(f"{run} has no parameters.json: the run did not finish")
    params = read_json_object(run / "parameters.json", "adapter", "router", "base", "mergeable")
    files = [f for f in sorted((run / "eval").glob("commonsense-*.json"))   # generation (Table 3), not --scoring loglik
             if read_json_object(f, "settings")["settings"].get("scoring", "generate") == "generate"]
    selects_winner = get_method(config["method"]).selects_winner
    if selects_winner:
        files = [f for f in files if (name := parse_component_label(f.stem)) is not None and name.winner]
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise ValueError(f"{run}: expected one commonsense evaluation of the {'winner' if selects_winner else 'run'} "
                         f"in {run / 'eval'} (found {found}); run `comlora eval --run {run}`")
    result = read_json_object(files[0], "tasks", "average")
    return {"run": str(run), "config": config, "params": params,
            "accuracy": {task: v["accuracy"] for task, v in result["tasks"].items()}, "average": result["average"]}


def comparison_rows(summaries: list[dict], group_by: tuple[str, ...] = GROUP_KEYS) -> list[dict]:
    """One row per configuration (``group_by`` keys of config.yaml): mean ± std over its runs."""
    unknown = [k for k in group_by if k not in summaries[0]["config"]]
    if unknown:
        raise ValueError(f"--group-by {unknown}: not options of a run's config.yaml ({sorted(summaries[0]['config'])})")
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        has_k = get_method(s["config"]["method"]).components_field is not None     # K means nothing to the others
        key = tuple(s["config"].get(k) if k != "num_components" or has_k else None for k in group_by)
        groups.setdefault(key, []).append(s)
    tasks = list(summaries[0]["accuracy"])
    rows = []
    for key, members in groups.items():
        p = members[0]["params"]
        row = {"configuration": ", ".join(f"{k}={v}" for k, v in zip(group_by, key) if v is not None),
               "runs": len(members),
               "params % (L/S)": f"{100 * p['adapter'] / p['base']:.2f}/{100 * p['router'] / p['base']:.2f}"}
        for task in tasks:
            row[task] = markdown.mean_std([m["accuracy"].get(task, float("nan")) for m in members])
        row["avg"] = markdown.mean_std([m["average"] for m in members])
        row["inference"] = "mergeable (zero overhead)" if p["mergeable"] else "not mergeable (runs its modules)"
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    return markdown.table(header, [[r[h] for h in header] for r in rows]) + "\n"


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()

"""The sections on the runs themselves: Figures 2 and 3, the early decision (beyond the paper) and the list of
recorded runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from string import Template
from typing import ClassVar

from comlora import markdown
from comlora.markdown import mean_std
from comlora.study import prose
from comlora.study.analysis import FIGURE2_PAIRS, LORA_R8, MAIN
from comlora.study.cells import p_text
from comlora.study.prose import fill
from comlora.study.sections.page import Page, missing_line

# ---- figures ------------------------------------------------------------------------------------------------------

@dataclass
class Figures:
    """Figures 2 and 3 of each recorded run of FIGURE2_PAIRS (drawn before: Page.figures), per pair and seed."""

    drawn: str                     # which pairs
    pairs: str
    template: ClassVar[Template] = prose.FIGURES


def figures(page: Page) -> Figures:
    study = page.study
    present = [(a, b) for a, b in FIGURE2_PAIRS if a in study.experiments]
    pairs = []
    for comlora, lora in present:
        runs = [fill(prose.NO_FIGURE, seed=f.seed, metrics=f.metrics) if f.figure2 is None else
                fill(prose.RUN_FIGURES, seed=f.seed, window=f.window,
                     beside=fill(prose.BESIDE_LORA, lora=study.label(lora)) if f.beside_lora else "",
                     figure2=os.path.relpath(f.figure2, page.path.parent),
                     figure3=os.path.relpath(f.figure3, page.path.parent))
                for f in page.figures if f.comlora == comlora]
        pairs.append(fill(prose.FIGURE_PAIR, comlora=study.label(comlora), missing=missing_line(study, [comlora, lora]),
                          runs="\n\n".join(runs)))
    drawn = " and ".join(fill(prose.BESIDE, comlora=study.label(a), lora=study.label(b)) for a, b in present)
    return Figures(drawn=drawn or prose.NO_RUN, pairs="\n\n".join(pairs))


# ---- early decision -----------------------------------------------------------------------------------------------

@dataclass
class EarlyDecision:
    """The experiments tagged decide: accuracy, when the decision fell, training time and compute, the machine's
    load, each paired against ComLoRA (2, 8) and LoRA r=8."""

    untagged: str = ""
    missing: str = ""
    table: str = ""
    loads: str = ""

    @property
    def template(self) -> Template:
        return prose.EARLY_DECISION_UNTAGGED if self.untagged else prose.EARLY_DECISION


def early_decision(page: Page) -> EarlyDecision:
    study = page.study

    def order(name: str) -> tuple:
        train = study.experiments[name].train or {}
        decide = (train.get("method_options") or {}).get("decide_at")
        return (train.get("method") == "comlora", 1.0 if decide is None else decide, name)

    names = sorted(study.tagged("decide"), key=order)
    if not names:
        return EarlyDecision(untagged=fill(prose.NOT_TAGGED, table="decide"))
    rows, loads = [], {}
    for name in names:
        runs = study.recorded(name)
        records = [r.record for r in runs]
        timed = [r for r in records if r.get("load_average_start") and r.get("load_average_end")]
        loads.update({(name, r["seed"]): (r["load_average_start"][0] + r["load_average_end"][0]) / 2 for r in timed})
        decided = sorted({r.decision["decided_at_step"] for r in runs if r.decision})
        steps = "/".join(map(str, sorted({r["steps"] for r in records if r.get("steps")})))
        against = [study.paired(name, other) if name != other else None for other in (MAIN, LORA_R8)]
        medians = [r.median_step_seconds() for r in runs]
        ratios = [m.alone / m.competing for m in medians if m.competing and m.alone]
        rows.append([study.label(name), len(runs), mean_std([r.result["average"] for r in runs]),
                     f"{', '.join(map(str, decided))} of {steps}" if decided else "–",
                     mean_std([r["train_seconds"] for r in records if r.get("train_seconds") is not None], 0),
                     mean_std([r["tokens_per_s"] for r in records if r.get("tokens_per_s") is not None], 0),
                     mean_std([p for p in (r.base_passes_per_token() for r in runs) if p is not None], 2),
                     " / ".join(mean_std([getattr(m, phase) for m in medians if getattr(m, phase) is not None])
                                for phase in ("competing", "alone")),
                     mean_std(ratios, 2),
                     ", ".join(f"{r['load_average_start'][0]:.1f}→{r['load_average_end'][0]:.1f}"
                               for r in timed) or "–",
                     *["–" if c is None else f"{c.interval()}, p {p_text(c.p_bootstrap)}" for c in against]])
    note = ""
    if loads:
        cpus = max((r.record.get("cpus") or 1) for name in names for r in study.recorded(name))
        low, high = min(loads.values()), max(loads.values())
        note = fill(prose.LOADS_DIFFER if high - low > cpus / 2 else prose.LOADS_ALIKE, lowest=f"{low:.1f}",
                    highest=f"{high:.1f}", cpus=cpus)
    table = markdown.table(["run", "seeds", "average accuracy", "decided at step", "training wall time (s)", "tokens/s",
                            "base-model passes per training token", "median s/step: competing / one adapter",
                            "one adapter ÷ competing, same run", "load average (1 min) start→end, per seed",
                            f"Δ vs {study.label(MAIN)}", f"Δ vs {study.label(LORA_R8)}"], rows)
    return EarlyDecision(missing=missing_line(study, names), table=table, loads=note)


# ---- recorded runs ------------------------------------------------------------------------------------------------

@dataclass
class RunList:
    """Every recorded run: when it started, at which commit, how long it trained and evaluated; nothing before a run
    is recorded."""

    table: str = ""
    runs: int = 0
    train_hours: str = ""
    eval_hours: str = ""

    @property
    def template(self) -> Template:
        return prose.RUN_LIST if self.table else prose.RUN_LIST_EMPTY


def run_list(page: Page) -> RunList:
    study = page.study
    rows = [[f"`{run.source}`", run.record.get("date", "–"), f"`{str(run.record.get('commit', 'unknown'))[:12]}`",
             *[f"{run.record[key]:.0f}" if run.record.get(key) is not None else "–"
               for key in ("train_seconds", "eval_seconds")], run.record.get("steps", "–")]
            for name in sorted(study.runs) for run in study.recorded(name)]
    if not rows:
        return RunList()
    records = [run.record for name in study.runs for run in study.recorded(name)]      # in the experiments' order
    train, evaluate = (sum(record.get(key) or 0.0 for record in records) for key in ("train_seconds", "eval_seconds"))
    return RunList(table=markdown.table(["run", "started", "commit", "train s", "eval s", "steps"], rows),
                   runs=len(records), train_hours=f"{train / 3600:.1f}", eval_hours=f"{evaluate / 3600:.1f}")

"""The sections on the paper's claims: the header (what the page comes from, the statistics), In short, and the
verdicts."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import ClassVar

from comlora import markdown
from comlora.study import prose
from comlora.study.analysis import LORA_R8, MAIN, Study
from comlora.study.cells import p_text, plural, seeds_text, signed
from comlora.study.comparisons import ComponentCheck
from comlora.study.prose import fill
from comlora.study.records import TASKS
from comlora.study.sections.page import Page, claims_tested
from comlora.study.statistics import ALPHA, BOOTSTRAP_SEED, NOT_DISTINGUISHABLE, RESAMPLES
from comlora.training.config import TrainConfig

# ---- header -------------------------------------------------------------------------------------------------------

@dataclass
class Header:
    """What the page was generated from, how many runs are recorded (and at which commits), the setting, the
    statistics."""

    command: str
    results: Path
    recorded: int
    planned: int
    experiments: int
    experiments_dir: Path
    latest_run: str
    one_commit: str
    commit_list: str
    unplanned: str
    base_file: Path
    model: str
    data: str
    train_per_task: int
    train_items: int
    val_size: int
    eval_size: int
    eval_items: int
    data_seed: int
    epochs: int
    lr: float
    eval_flags: str
    paper_file: Path
    resamples: str
    bootstrap_seed: int
    alpha: float
    claims_tested: str
    one_in: int
    template: ClassVar[Template] = prose.HEADER


def header(page: Page) -> Header:
    study = page.study
    planned = [(n, s) for n, e in sorted(study.experiments.items()) for s in e.seeds]
    recorded = [study.runs[n][s] for n, s in planned if s in study.runs[n]]
    commits: dict[str, list[str]] = {}
    for run in recorded:
        commits.setdefault(run.record.get("commit", "unknown"), []).append(run.source)
    base = TrainConfig.from_dict(study.base)          # the defaults filled in
    flags = recorded[0].record.get("eval_flags", []) if recorded else []
    listed = "\n".join(f"- `{commit}`: {', '.join(runs)}" for commit, runs in commits.items())
    return Header(
        command=page.command, results=study.results, recorded=len(recorded), planned=len(planned),
        experiments=len(study.experiments), experiments_dir=study.experiments_dir,
        latest_run=fill(prose.LATEST_RUN, date=max(r.record.get("date", "") for r in recorded)) if recorded else "",
        one_commit=fill(prose.ONE_COMMIT, commit=next(iter(commits))) if len(commits) == 1 else "",
        commit_list=fill(prose.COMMITS, commits=listed) if len(commits) > 1 else "",
        unplanned=fill(prose.UNPLANNED, runs=", ".join(study.unplanned)) if study.unplanned else "",
        base_file=study.experiments_dir / "base.yaml", model=base.model, data=base.data,
        train_per_task=base.train_per_task, train_items=len(TASKS) * base.train_per_task, val_size=base.val_size,
        eval_size=base.eval_size, eval_items=len(TASKS) * base.eval_size, data_seed=base.data_seed,
        epochs=base.epochs, lr=base.lr, eval_flags=" ".join(flags) or prose.NO_EVALUATION_YET,
        paper_file=study.paper_file, resamples=f"{RESAMPLES:,}", bootstrap_seed=BOOTSTRAP_SEED, alpha=ALPHA,
        claims_tested=claims_tested(study), one_in=round(1 / ALPHA))


# ---- in short -----------------------------------------------------------------------------------------------------

@dataclass
class Summary:
    """The answer for a user choosing between LoRA and ComLoRA: the count of verdicts, the main paired comparison and
    the training compute of each choice, the spread between seeds, the scale of the accuracies."""

    claims_tested: str
    measured: str
    decided: str
    choices: str
    seed_range: str
    scale: str
    template: ClassVar[Template] = prose.SUMMARY


def summary(page: Page) -> Summary:
    study = page.study
    named = [(o.claim["claim"], o.verdict) for o in study.claim_outcomes if o.comparison is not None]
    if study.table10 is not None:
        named.append((prose.TABLE10_NAMED, study.table10.verdict))
    named += [(fill(prose.FIGURE2_NAMED, comlora=study.label(o.comlora), lora=study.label(o.lora)), o.verdict)
              for o in study.figure2 if o.comparison is not None]
    if study.figure3 is not None:
        named.append((prose.FIGURE3_NAMED, study.figure3.verdict))
    counts = Counter(result for _, result in named)                # in the order of first appearance
    decided = [f"{claim} — {result}" for claim, result in named if result != NOT_DISTINGUISHABLE]
    return Summary(claims_tested=claims_tested(study),
                   measured=fill(prose.MEASURED, count=len(named), counts=", ".join(f"{n} {v}" for v, n in
                                                                                     counts.items()))
                   if named else prose.NONE_MEASURED,
                   decided=fill(prose.DECIDED, claims="; ".join(decided)) if decided else "",
                   choices=choices(study), seed_range=seed_range(study), scale=scale_note(study))


def choices(study: Study) -> str:
    """ComLoRA (2, 8) against LoRA r=8, and each early decision against LoRA r=8: accuracy and training compute."""
    c = study.paired(MAIN, LORA_R8)
    if c is None:
        return ""
    passes = {name: [p for p in (r.base_passes_per_token() for r in study.recorded(name)) if p is not None]
              for name in [MAIN, LORA_R8, *study.tagged("decide")]}

    def cost(name: str) -> str:
        return f"{statistics.mean(passes[name]):.2f}" if passes.get(name) else "–"

    lines = [fill(prose.CHOICE, main=study.label(MAIN), lora=study.label(LORA_R8), items=c.items,
                  seeds=", ".join(map(str, c.seeds)), accuracy_a=f"{c.accuracy_a:.1f}",
                  accuracy_b=f"{c.accuracy_b:.1f}", interval=c.interval(), p=p_text(c.p_bootstrap),
                  outcome=c.outcome("ComLoRA", "LoRA"), main_cost=cost(MAIN), lora_cost=cost(LORA_R8))]
    for name in [n for n in study.tagged("decide") if n not in (MAIN, LORA_R8)]:
        d = study.paired(name, LORA_R8)
        if d is not None:
            lines.append(fill(prose.DECIDE_CHOICE, name=study.label(name), lora=study.label(LORA_R8),
                              accuracy_a=f"{d.accuracy_a:.1f}", accuracy_b=f"{d.accuracy_b:.1f}", interval=d.interval(),
                              p=p_text(d.p_bootstrap), cost=cost(name)))
    return "\n".join(lines)


def seed_range(study: Study) -> str:
    """The main configuration's averages over its seeds, against which the one-seed ablations are read."""
    main = {r.seed: r.result["average"] for r in study.recorded(MAIN)}
    if len(main) < 2:
        return ""
    return fill(prose.SEED_RANGE, main=study.label(MAIN), averages=", ".join(f"{a:.1f}" for a in main.values()),
                seeds=", ".join(map(str, main)), range=f"{max(main.values()) - min(main.values()):.1f}",
                first_seed=min(main), first_average=f"{main[min(main)]:.1f}")


def scale_note(study: Study) -> str:
    """The trained Table 3 rows against chance and one fixed answer; its conclusion only when no trained method
    beats one fixed answer per task."""
    trained = [n for n in study.table3_recorded if any(r.config for r in study.recorded(n))]
    if study.baselines is None or not trained:
        return ""
    uniform, fixed = (statistics.mean(b.values()) for b in study.baselines)
    averages = [statistics.mean(r.result["average"] for r in study.recorded(n)) for n in trained]
    habits = [r.habits for n in trained for r in study.recorded(n)]
    same, none = [h.same for h in habits], [h.none for h in habits]
    return fill(prose.SCALE, uniform=f"{uniform:.1f}", fixed=f"{fixed:.1f}", lowest=f"{min(averages):.1f}",
                highest=f"{max(averages):.1f}", same_lowest=f"{min(same):.0f}", same_highest=f"{max(same):.0f}",
                none_highest=f"{max(none):.1f}", not_learned=prose.NOT_LEARNED if max(averages) < fixed else "")


# ---- verdicts -----------------------------------------------------------------------------------------------------

@dataclass
class Verdicts:
    """The verdict on each claim of the paper: the accuracy claims (a table), Table 10's and Figure 3's counts, and
    Figure 2's claim on training loss (a table)."""

    claims: str
    table10_claim: str
    blocks: str
    resamples: str
    figure2: str
    gradient_norms: str
    figure3_claim: str
    template: ClassVar[Template] = prose.VERDICTS


def verdicts(page: Page) -> Verdicts:
    study = page.study
    rows = []
    for o in study.claim_outcomes:
        paper = f"{o.paper_better:.2f} vs {o.paper_than:.2f} ({o.claim['table'].replace('table', 'Table ')})"
        c = o.comparison
        rows.append([o.claim["claim"], paper, *["–"] * 5, o.verdict] if c is None else
                    [o.claim["claim"], paper, f"{c.accuracy_a:.1f} vs {c.accuracy_b:.1f}", c.interval(),
                     p_text(c.p_bootstrap), p_text(c.p_sign), seeds_text(c.seeds), f"**{o.verdict}**"])
    figure2 = []
    for o in study.figure2:
        c = o.comparison
        cells = (["–"] * 5 if c is None else
                 [seeds_text(c.seeds), f"{c.every_lower} of {c.steps}",
                  f"{c.difference:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
                  ", ".join(f"{x:+.3f}" for x in c.per_seed), p_text(c.p_bootstrap)])
        figure2.append([study.label(o.comlora), study.label(o.lora), *cells, f"**{o.verdict}**"])
    blocks = " or ".join(sorted({str(o.comparison.block) for o in study.figure2 if o.comparison is not None}))
    return Verdicts(
        claims=markdown.table(["claim of the paper", "paper avg (LLaMA-3-8B)", "this study", "Δ points [95% CI]",
                               "p (bootstrap)", "p (sign test)", "seeds", "verdict"], rows),
        table10_claim=table10_claim(study), blocks=blocks or prose.FIGURE3_WINDOW, resamples=f"{RESAMPLES:,}",
        figure2=markdown.table(["ComLoRA", "LoRA", "seeds", "steps with every component lower",
                                "LoRA − highest component, mean [95% CI]", "per seed", "p (bootstrap)", "verdict"],
                               figure2),
        gradient_norms=gradient_norms(study), figure3_claim=figure3_claim(study))


def table10_claim(study: Study) -> str:
    outcome = study.table10
    if outcome is None:
        return fill(prose.TABLE10_NOT_MEASURED, claim=prose.TABLE10_CLAIM,
                    missing="; ".join(study.missing([MAIN])) or prose.COMPONENT_EVALUATIONS)
    checks = outcome.checks
    return fill(prose.TABLE10_MEASURED, claim=prose.TABLE10_CLAIM, runs=len(checks),
                experiments=plural(len({c.run.experiment for c in checks}), "experiment"), best=outcome.winners_best,
                chances=", ".join(f"{c.chance:.2f}" for c in checks), p=p_text(outcome.p), verdict=outcome.verdict,
                lowest_loss=outcome.lowest_loss_best, margins=table10_margins(checks))


def table10_margins(checks: list[ComponentCheck]) -> str:
    """The winner's lead over the best other component on the test items, over the runs of the claim."""
    gaps = [c.against_best_other for c in checks if c.against_best_other is not None]
    if not gaps:
        return ""
    alone = (fill(prose.NONE_SIGNIFICANT, p=p_text(min(g.p_bootstrap for g in gaps)))
             if all(g.p_bootstrap >= ALPHA for g in gaps) else
             fill(prose.SOME_SIGNIFICANT, significant=sum(g.p_bootstrap < ALPHA for g in gaps), runs=len(gaps)))
    return fill(prose.TABLE10_MARGINS, lowest=signed(min(g.difference for g in gaps)),
                highest=signed(max(g.difference for g in gaps)), alone=alone)


def gradient_norms(study: Study) -> str:
    """Figure 2's pairs' median gradient norm before clipping (metrics.jsonl grad_norm), and the clipping norm."""
    parts, clip = [], set()
    for o in study.figure2:
        if o.comparison is None:
            continue
        runs = {name: [study.runs[name][s] for s in o.comparison.seeds] for name in (o.comlora, o.lora)}
        norms = {name: [step["grad_norm"] for r in rs for step in r.training_steps if "grad_norm" in step]
                 for name, rs in runs.items()}
        if not all(norms.values()):
            continue
        clip |= {r.max_grad_norm for rs in runs.values() for r in rs}
        parts.append(fill(prose.GRADIENT_NORM_PAIR, comlora=study.label(o.comlora),
                          comlora_norm=f"{statistics.median(norms[o.comlora]):.2f}", lora=study.label(o.lora),
                          lora_norm=f"{statistics.median(norms[o.lora]):.2f}"))
    if not parts or len(clip) != 1 or not next(iter(clip)):
        return ""
    return fill(prose.GRADIENT_NORMS, norms="; ".join(parts), clip=f"{next(iter(clip)):g}")


def figure3_claim(study: Study) -> str:
    outcome = study.figure3
    if outcome is None:
        return fill(prose.FIGURE3_NOT_MEASURED, claim=prose.FIGURE3_CLAIM)
    checks = outcome.checks
    return fill(prose.FIGURE3_MEASURED, claim=prose.FIGURE3_CLAIM, runs=len(checks), dominant=outcome.winners_dominant,
                chances=", ".join(f"{len(c.dominant_at_the_end) / len(c.components):.2f}" for c in checks),
                p=p_text(outcome.p), verdict=outcome.verdict, rose=outcome.rose)

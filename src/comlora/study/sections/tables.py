"""The sections of the paper's tables: Table 3 (and against chance), ComLoRA against each LoRA row, the ablations
(Tables 5-9) and Table 10."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from string import Template
from typing import ClassVar

from comlora import markdown
from comlora.markdown import mean_std
from comlora.study import prose
from comlora.study.analysis import ABLATION_TABLES, MAIN, TABLE3_ORDER, Study
from comlora.study.cells import p_text, paper_cells, seeds_text, signed
from comlora.study.prose import fill, render
from comlora.study.records import TASKS
from comlora.study.sections.page import COLUMNS, Page, accuracy_cells, missing_line, no_accuracy
from comlora.study.statistics import ALPHA

# ---- Table 3 ------------------------------------------------------------------------------------------------------

@dataclass
class Table3:
    """The methods on the 8 commonsense tasks, beside the paper's rows."""

    missing: str
    table: str
    unmatched: str                 # the paper's rows without a counterpart here
    base_model_note: str
    template: ClassVar[Template] = prose.TABLE3


def table3(page: Page) -> Table3:
    study = page.study
    names = [n for n in TABLE3_ORDER if n in study.experiments and "table3" in study.experiments[n].tables]
    names += [n for n in study.tagged("table3") if n not in names]
    paper_rows = {r["experiment"]: r for r in study.paper["tables"]["table3"]["rows"] if r["experiment"]}
    rows = []
    for name in names:
        runs = study.recorded(name)
        params = "–"
        if runs and runs[0].parameters:
            p = runs[0].parameters
            params = f"{100 * p['adapter'] / p['base']:.2f}/{100 * p['router'] / p['base']:.2f}"
        rows.append([study.label(name), len(runs), params, *(accuracy_cells(runs) if runs else no_accuracy())])
        if name in paper_rows:
            r = paper_rows[name]
            rows.append([f"↳ *paper: {r['row']}*", "", r["params_l_s"], *paper_cells(r)])
    base_model = any(not study.experiments[n].train and len(study.experiments[n].seeds) == 1
                     and all("--greedy" in r.record.get("eval_flags", []) for r in study.recorded(n)) for n in names)
    return Table3(missing=missing_line(study, names),
                  table=markdown.table(["method", "seeds", "L/S %", *COLUMNS, "average"], rows),
                  unmatched=", ".join(r["row"] for r in study.paper["tables"]["table3"]["rows"] if not r["experiment"]),
                  base_model_note=prose.BASE_MODEL_NOTE if base_model else "")


@dataclass
class AgainstChance:
    """Table 3's rows against chance and one fixed answer per task, the share of a task's items each run gave its
    most common answer, and the share of responses with no answer; nothing before a Table 3 run is recorded."""

    uniform: str = ""
    uniform_average: str = ""
    fixed: str = ""
    fixed_average: str = ""
    table: str = ""

    @property
    def template(self) -> Template:
        return prose.AGAINST_CHANCE if self.table else prose.AGAINST_CHANCE_NO_RUN


def against_chance(page: Page) -> AgainstChance:
    study = page.study
    if study.baselines is None:
        return AgainstChance()
    uniform, fixed = study.baselines
    rows = []
    for name in study.table3_recorded:
        runs = study.recorded(name)
        habits = [r.habits for r in runs]
        average = statistics.mean(r.result["average"] for r in runs)
        rows.append([study.label(name), len(runs), mean_std([r.result["average"] for r in runs]),
                     signed(average - statistics.mean(uniform.values())),
                     signed(average - statistics.mean(fixed.values())),
                     mean_std([h.same for h in habits]), mean_std([h.none for h in habits])])
    return AgainstChance(uniform=", ".join(f"{c} {uniform[t]:.0f}" for t, c in TASKS),
                         uniform_average=f"{statistics.mean(uniform.values()):.1f}",
                         fixed=", ".join(f"{c} {fixed[t]:.0f}" for t, c in TASKS),
                         fixed_average=f"{statistics.mean(fixed.values()):.1f}",
                         table=markdown.table(["method", "seeds", "average", "Δ vs random pick", "Δ vs fixed answer",
                                               "same answer %", "no answer %"], rows))


@dataclass
class PairedLora:
    """ComLoRA (2, 8) against each LoRA row of Table 3, paired on the items."""

    main: str
    missing: str
    table: str
    template: ClassVar[Template] = prose.PAIRED_LORA


def paired_lora(page: Page) -> PairedLora:
    study = page.study
    loras = list(dict.fromkeys(n for n in TABLE3_ORDER + study.tagged("table3") if n in study.experiments
                               and (study.experiments[n].train or {}).get("method") == "lora"))
    rows = []
    for name in loras:
        c = study.paired(MAIN, name)
        rows.append([study.label(name)] + ["–"] * 8 if c is None else
                    [study.label(name), seeds_text(c.seeds), c.items, f"{c.accuracy_a:.1f} vs {c.accuracy_b:.1f}",
                     c.interval(), p_text(c.p_bootstrap), f"{c.a_better} / {c.b_better}", p_text(c.p_sign),
                     c.outcome("ComLoRA", "LoRA")])
    main = study.label(MAIN)
    return PairedLora(main=main, missing=missing_line(study, [MAIN, *loras]),
                      table=markdown.table(["LoRA row", "seeds", "items", f"{main} vs LoRA", "Δ points [95% CI]",
                                            "p (bootstrap)", "items better / worse", "p (sign test)",
                                            f"at p < {ALPHA}"], rows))


# ---- ablations ----------------------------------------------------------------------------------------------------

@dataclass
class Ablation:
    """One ablation table of the paper (Tables 5-9): its rows beside the paper's, each paired with the full row."""

    title: str
    untagged: str = ""             # no experiment of the study is tagged with the table
    missing: str = ""
    table: str = ""
    setting: str = ""              # the paper's
    comparisons: str = ""

    @property
    def template(self) -> Template:
        return prose.ABLATION_UNTAGGED if self.untagged else prose.ABLATION


@dataclass
class Ablations:
    tables: str                    # each ABLATION_TABLES's Ablation
    template: ClassVar[Template] = prose.ABLATIONS


def ablations(page: Page) -> Ablations:
    return Ablations("\n\n".join(render(ablation(page.study, table)) for table in ABLATION_TABLES))


def ablation(study: Study, table: str) -> Ablation:
    spec = study.paper["tables"][table]
    members = study.tagged(table)
    by_experiment = {r["experiment"]: r for r in spec["rows"] if r["experiment"]}
    names = [r["experiment"] for r in spec["rows"] if r["experiment"] in members]
    names += [n for n in members if n not in names]
    if not names:
        return Ablation(spec["title"], untagged=fill(prose.NOT_TAGGED, table=table))
    full_seeds = sorted(study.runs.get(MAIN, {}))
    compared = sorted({tuple(c.seeds) for n in names if n != MAIN and (c := study.paired(n, MAIN)) is not None
                       and list(c.seeds) != full_seeds})           # the full row's seeds a paired test uses
    rows, stats = [], []
    for name in names:
        runs = study.recorded(name)
        label = study.label(name) + (" (full)" if name == MAIN else "")
        rows.append([label, len(runs), *(accuracy_cells(runs) if runs else no_accuracy())])
        if name in by_experiment:
            r = by_experiment[name]
            rows.append([f"↳ *paper: {r['row']}*", "", *paper_cells(r)])
        if name == MAIN:
            rows += [[f"{label}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}", len(seeds),
                      *accuracy_cells([study.runs[MAIN][s] for s in seeds])] for seeds in compared]
            continue
        c = study.paired(name, MAIN)
        paper_delta = (f"{by_experiment[name]['average'] - by_experiment[MAIN]['average']:+.2f}"
                       if name in by_experiment and MAIN in by_experiment else "–")
        claimed = any(cl["table"] == table and cl["better"] == MAIN and cl["than"] == name
                      for cl in study.paper["claims"])
        stats.append([label, "–", "–", "–", "–", paper_delta, "not measured yet"] if c is None else
                     [label, seeds_text(c.seeds), c.interval(), p_text(c.p_bootstrap), p_text(c.p_sign), paper_delta,
                      c.verdict(paper_sign=-1) if claimed else "–"])
    return Ablation(spec["title"], missing=missing_line(study, names),
                    table=markdown.table(["run", "seeds", *COLUMNS, "average"], rows), setting=spec["setting"],
                    comparisons=markdown.table(["run", "seeds", "Δ points [95% CI]", "p (bootstrap)", "p (sign test)",
                                                "paper Δ (avg)", "the paper's claim (full is better)"], stats))


# ---- Table 10 -----------------------------------------------------------------------------------------------------

@dataclass
class Table10:
    """Every evaluated component of the ComLoRA runs, whether the winner was the best, and the paper's Table 10."""

    missing: str
    components: str                # nothing before a run with every component evaluated is recorded
    setting: str                   # the paper's
    paper: str
    template: ClassVar[Template] = prose.TABLE10


def table10(page: Page) -> Table10:
    study = page.study
    rows, checks = [], []
    for check in study.component_checks:
        run, val_loss = check.run, check.run.winner.get("val_loss")
        for k, result in check.components.items():
            rows.append([study.label(run.experiment), run.seed, f"{k}{' **(winner)**' if k == check.winner else ''}",
                         *[f"{result['tasks'][t]['accuracy']:.1f}" for t, _ in TASKS], f"{result['average']:.1f}",
                         f"{val_loss[k]:.4f}" if val_loss else "–"])
        gap = check.against_best_other
        by_similarity, by_loss = run.winner.get("winner_by_similarity"), run.winner.get("winner_by_loss")
        checks.append([study.label(run.experiment), run.seed, len(check.components), check.winner,
                       "–" if by_similarity is None else by_similarity, "–" if by_loss is None else by_loss,
                       ", ".join(map(str, check.best)), "yes" if check.winner_is_best else "no",
                       "–" if not val_loss else ("yes" if check.winner in check.lowest_val_loss else "no"),
                       "–" if gap is None else f"{gap.interval()}, p {p_text(gap.p_bootstrap)}",
                       check.outside_the_claim and f"no: {check.outside_the_claim}" or "yes"])
    components = "" if not rows else fill(
        prose.TABLE10_COMPONENTS,
        components=markdown.table(["run", "seed", "component", *COLUMNS, "average", "validation loss"], rows),
        checks=markdown.table(["run", "seed", "K", "winner", "by selector", "by validation loss",
                               "best on the test items", "winner best on test?", "winner lowest validation loss?",
                               "winner − best other, points [95% CI], p", "in the claim"], checks))
    paper = study.paper["tables"]["table10"]
    return Table10(missing=missing_line(study, [n for n, e in study.experiments.items() if e.components == "all"]),
                   components=components, setting=paper["setting"],
                   paper=markdown.table(["component", *COLUMNS, "average"],
                                        [[r["row"], *paper_cells(r)] for r in paper["rows"]]))

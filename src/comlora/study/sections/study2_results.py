"""Study II's results on the page, one section per track (ConvAI2 first): In short, the results table, the verdicts
(results2.TrackResults) and the figures. Each section is None when the page has no Study II or no such track."""

from __future__ import annotations

import os
import statistics
from collections import Counter
from dataclasses import dataclass
from string import Template
from typing import ClassVar

from comlora import markdown
from comlora.markdown import mean_std
from comlora.study import prose
from comlora.study.cells import p_text, seeds_text, signed
from comlora.study.experiments import load_evaluations
from comlora.study.prose import fill
from comlora.study.results2 import (
    GENERATED,
    MAIN_TABLE,
    NOT_MEASURED,
    ComponentScores,
    Pair,
    ResultRow,
    TrackResults,
)
from comlora.study.sections.study2 import size_ses, sizes_list
from comlora.study.statistics import ALPHA, BOOTSTRAP_SEED, RESAMPLES
from comlora.study.tracks import COMMONSENSE, CONVAI2, PILOT, Track, flag_value


@dataclass
class TrackResultsSection:
    """One track's results: In short, the table of its rows, the verdict on each claim, the figures."""

    title: str
    folder: str
    main_table: str
    paper_table: str
    generation: str
    missing: str
    in_short: str
    table: str
    columns: str
    method: str
    comparisons: str
    claims: str
    generated: str
    table10: str
    costs: str
    figure2: str
    clipping: str
    figures: str
    template: ClassVar[Template] = prose.RESULTS2


class Text:
    """How a track writes its primary metric: name, digits, unit."""

    def __init__(self, track: Track):
        convai2 = track.task == CONVAI2
        self.metric = "test NLL per token" if convai2 else "acc_norm"
        self.digits = 4 if convai2 else 1
        self.unit = " nats per token" if convai2 else " points"

    def value(self, x: float) -> str:
        return f"{x:.{self.digits}f}"

    def delta(self, x: float) -> str:
        return signed(x, self.digits)

    def interval(self, c) -> str:
        return f"{self.delta(c.paired.difference)} [{self.delta(c.ci_low)}, {self.delta(c.ci_high)}]"


# ---- the results table --------------------------------------------------------------------------------------------

def seeds_cell(row: ResultRow) -> str:
    recorded = [r.seed for r in row.runs]
    if recorded == row.planned:
        return ", ".join(map(str, recorded))
    return f"{', '.join(map(str, recorded)) or 'none'} (of {', '.join(map(str, row.planned))})"


def results_table(track: Track, results: TrackResults) -> str:
    convai2 = track.task == CONVAI2
    rows = []
    for row in results.rows:
        cells = [row.label, seeds_cell(row), mean_std(row.primary, 4 if convai2 else 1),
                 mean_std(row.secondary, 2 if convai2 else 1)]
        if convai2:
            cells += [mean_std(row.generated[k], 2) for k in GENERATED]
        rows.append(cells + [mean_std(row.train_hours, 2), mean_std(row.passes, 2)])
    header = (["run", "seeds", "test NLL per token", "perplexity", *GENERATED.values()] if convai2 else
              ["run", "seeds", "acc_norm", "acc"])
    return markdown.table(header + ["training h", "passes per token"], rows)


# ---- the verdicts -------------------------------------------------------------------------------------------------

def claim_names(track: Track, results: TrackResults) -> dict[str, str]:
    text, label = Text(track), results.label
    table = MAIN_TABLE[track.task].replace("table", "Table ")
    names = dict(main=fill(prose.CLAIM_MAIN, table=table, main=label("main"), lora8=label("lora-r8"),
                           lora16=label("lora-r16"), metric=text.metric),
                 second=fill(prose.CLAIM_SECOND, table=table, k4=label("k4"), main=label("main"),
                             lora8=label("lora-r8"), lora16=label("lora-r16")),
                 decide=fill(prose.CLAIM_DECIDE, decide=label("decide"), main=label("main")),
                 compute=fill(prose.CLAIM_COMPUTE, main=label("main"), compute=label("lora-r8-2epochs")),
                 clipping=fill(prose.CLAIM_CLIPPING, main=label("main"), joint=label("joint"), metric=text.metric),
                 clipping_loss=fill(prose.CLAIM_CLIPPING_LOSS, main=label("main"), joint=label("joint")),
                 table10=prose.TABLE10_NAMED2)
    for comlora, lora, _ in results.figure2:
        names[f"figure2-{comlora}"] = fill(prose.FIGURE2_NAMED, comlora=label(comlora), lora=label(lora))
    return names


def per_seed_text(values: list[float], digits: int) -> str:
    return ", ".join(signed(v, digits) for v in values)


def comparisons_table(track: Track, results: TrackResults) -> str:
    """One row per comparison of the claims: A and B on the paired items, Δ, p, Δ per seed, its verdict."""
    text, rows = Text(track), []
    table = MAIN_TABLE[track.task].replace("table", "Table ")
    short = dict(main=table, second=f"{table}, second", decide="early decision", compute="compute-matched",
                 clipping="clipping")
    for key, claim in results.claims.items():
        for pair in claim.pairs:
            c = pair.comparison
            against = f"{results.label(pair.a)} against {results.label(pair.b)}"
            rows.append([short[key], against, *["–"] * 6, pair.verdict] if c is None else
                        [short[key], against, seeds_text(c.seeds), text.value(c.value_a), text.value(c.value_b),
                         text.interval(c), p_text(c.p), per_seed_text(c.per_seed, text.digits), f"**{pair.verdict}**"])
    unit = "nats per token" if track.task == CONVAI2 else "points"
    return markdown.table(["claim", "A against B", "seeds", f"A: {text.metric}", f"B: {text.metric}",
                           f"Δ {unit} [95% CI]", "p (bootstrap)", "Δ per seed", "verdict"], rows)


def generated_summary(pairs: list[Pair]) -> tuple[int, int, int]:
    """(comparisons with A's mean higher, comparisons, those with A higher in every common seed) over the pairs'
    generated metrics."""
    compared = [g for p in pairs for g in p.generated]
    higher = sum(statistics.mean(g.per_seed) > 0 for g in compared)
    return higher, len(compared), sum(g.higher == len(g.seeds) for g in compared)


def claim_detail(track: Track, results: TrackResults, key: str, pairs: list[Pair]) -> str:
    """What a claim's line adds to its verdict: the missing runs (which make a measured verdict provisional), the
    comparisons whose seeds disagree in sign, the observed order, the costs, the generated metrics."""
    detail = ""
    missing = "; ".join(dict.fromkeys(m for p in pairs for m in p.missing))
    if missing:
        measured = all(p.comparison is not None for p in pairs)
        detail += fill(prose.PROVISIONAL_DETAIL if measured else prose.NOT_MEASURED_DETAIL, missing=missing)
    split = [p for p in pairs if p.comparison is not None and p.comparison.seeds_disagree]
    if split:
        digits = Text(track).digits
        detail += fill(prose.SEEDS_DISAGREE_DETAIL, pairs="; ".join(
            f"{results.label(p.a)} against {results.label(p.b)} {per_seed_text(p.comparison.per_seed, digits)}"
            for p in split))
    if key == "main" and track.task == CONVAI2 and any(p.generated for p in pairs):
        higher, compared, every = generated_summary(pairs)
        detail += fill(prose.GENERATED_DETAIL, main=results.label("main"), higher=higher, pairs=compared, every=every)
    if key == "second" and results.order:
        text = Text(track)
        detail += fill(prose.ORDER_DETAIL, metric=text.metric,
                       order=", ".join(f"{results.label(role)} {text.value(v)}" for role, v in results.order))
    if key in ("decide", "compute"):
        cost = [results.passes(role) for role in (pairs[0].a, pairs[0].b)]
        if None not in cost:
            detail += fill(prose.PASSES_DETAIL, a=f"{cost[0]:.2f}", b=f"{cost[1]:.2f}")
    return detail


def claims_list(track: Track, results: TrackResults, names: dict[str, str]) -> str:
    lines = [fill(prose.CLAIM_LINE, claim=names[key], verdict=claim.verdict,
                  detail=claim_detail(track, results, key, claim.pairs)) for key, claim in results.claims.items()]
    return "\n".join(lines) + ("\n\n" + prose.DECIDE_NOTE if "decide" in results.claims else "")


def generated_table(results: TrackResults) -> str:
    pairs = [p for claim in results.claims.values() for p in claim.pairs if p.generated]
    if not pairs:
        return ""
    rows = []
    for pair in pairs:
        found = {g.metric: g for g in pair.generated}
        rows.append([f"{results.label(pair.a)} against {results.label(pair.b)}",
                     seeds_text(sorted({s for g in pair.generated for s in g.seeds})),
                     *["–" if k not in found else f"{signed(statistics.mean(found[k].per_seed), 2)} "
                       f"({per_seed_text(found[k].per_seed, 2)})" for k in GENERATED]])
    return fill(prose.GENERATED2, table=markdown.table(["A against B", "seeds", *GENERATED.values()], rows))


def table10_text(track: Track, results: TrackResults) -> str:
    outcome = results.table10
    if outcome is None:
        return fill(prose.TABLE10_2_NOT_MEASURED, claim=prose.TABLE10_NAMED2)
    text = Text(track)

    def row(c: ComponentScores) -> list[str]:
        g = c.against_best_other
        return [f"`{c.run.source}`", ", ".join(f"{k}: {text.value(v)}" for k, v in c.scores.items()), str(c.winner),
                "–" if c.lowest_loss is None else str(c.lowest_loss), ", ".join(map(str, c.best)),
                "–" if c.best_other is None else str(c.best_other),
                "–" if g is None else f"{text.interval(g)}, p {p_text(g.p)}"]

    lowest_loss = (" " + fill(prose.TABLE10_LOWEST_LOSS2, best=outcome.lowest_loss_best,
                              runs=outcome.lowest_loss_runs) if outcome.lowest_loss_runs else "")
    table = markdown.table(["run", f"{text.metric} per component", "winner", "lowest validation loss", "best",
                            "best other", "winner − best other [95% CI], p"], [row(c) for c in outcome.checks])
    return fill(prose.TABLE10_2, claim=prose.TABLE10_NAMED2, runs=len(outcome.checks), metric=text.metric,
                best=outcome.winners_best, lowest_loss=lowest_loss,
                chances=", ".join(f"{c.chance:.2f}" for c in outcome.checks), p=p_text(outcome.p),
                verdict=outcome.verdict, table=table)


def costs_text(results: TrackResults) -> str:
    roles = [r for r in ("main", "decide", "lora-r8-2epochs", "lora-r8") if r in results.roles]
    known = [(r, results.passes(r)) for r in roles if results.passes(r) is not None]
    return fill(prose.COSTS2, passes=", ".join(f"{results.label(r)} {v:.2f}" for r, v in known)) if known else ""


def figure2_text(results: TrackResults) -> str:
    if not results.figure2:
        return ""
    rows = []
    for comlora, lora, c in results.figure2:
        cells = (["–"] * 5 + [NOT_MEASURED] if c is None else
                 [seeds_text(c.seeds), f"{c.every_lower} of {c.steps}",
                  f"{c.difference:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
                  ", ".join(f"{x:+.3f}" for x in c.per_seed), p_text(c.p_bootstrap), f"**{c.verdict()}**"])
        rows.append([results.label(comlora), results.label(lora), *cells])
    return fill(prose.FIGURE2_2, resamples=f"{RESAMPLES:,}", table=markdown.table(
        ["ComLoRA", "LoRA", "seeds", "steps with every component lower", "LoRA − highest component, mean [95% CI]",
         "per seed", "p (bootstrap)", "verdict"], rows))


def clipping_text(results: TrackResults) -> str:
    if "joint" not in results.roles or "main" not in results.roles:
        return ""
    c, names = results.clipping_loss, dict(main=results.label("main"), joint=results.label("joint"))
    if c is None:
        return fill(prose.CLIPPING_LOSS_NOT_MEASURED, **names)
    return fill(prose.CLIPPING_LOSS, **names, steps=c.steps, seeds=seeds_text(c.seeds),
                interval=f"{c.difference:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
                per_seed=", ".join(f"{x:+.3f}" for x in c.per_seed), p=p_text(c.p_bootstrap), block=c.block,
                verdict=c.verdict(), lower=c.every_lower)


def figures_text(page, track: Track) -> str:
    drawn = page.track_figures.get(track.name, [])
    if not drawn:
        return prose.TRACK_NO_FIGURES
    runs = []
    for f in drawn:
        label = track.experiments[f.comlora].label
        if f.figure2 is None:
            runs.append(fill(prose.TRACK_NO_FIGURE, label=label, seed=f.seed, metrics=f.metrics))
            continue
        beside = " and ".join(track.experiments[name].label for name in f.beside)
        runs.append(fill(prose.TRACK_RUN_FIGURES, label=label, seed=f.seed, window=f.window,
                         beside=fill(prose.BESIDE_RUNS, runs=beside) if beside else "",
                         figure2=os.path.relpath(f.figure2, page.path.parent),
                         figure3=os.path.relpath(f.figure3, page.path.parent)))
    return fill(prose.TRACK_FIGURES, runs="\n\n".join(runs))


# ---- in short -----------------------------------------------------------------------------------------------------

def named_verdicts(track: Track, results: TrackResults, names: dict[str, str]) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) of every claim the track tests, in the page's order."""
    text, out = Text(track), []
    for key, claim in results.claims.items():
        measured = [p for p in claim.pairs if p.comparison is not None]
        evidence = "; ".join(f"{results.label(p.a)} against {results.label(p.b)} Δ {text.interval(p.comparison)}"
                             f"{text.unit}, p {p_text(p.comparison.p)}" for p in measured)
        extra = claim_detail(track, results, key, claim.pairs) if claim.verdict != NOT_MEASURED else ""
        out.append((names[key], claim.verdict, f" ({evidence}{extra})" if evidence else ""))
    outcome = results.table10
    out.append((names["table10"], NOT_MEASURED if outcome is None else outcome.verdict,
                "" if outcome is None else f" (the winner best in {outcome.winners_best} of {len(outcome.checks)} "
                f"runs, P by chance {p_text(outcome.p)})"))
    for comlora, _, c in results.figure2:
        out.append((names[f"figure2-{comlora}"], NOT_MEASURED if c is None else c.verdict(),
                    "" if c is None else f" ({c.difference:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}], "
                    f"p {p_text(c.p_bootstrap)})"))
    if "joint" in results.roles and "main" in results.roles:
        c = results.clipping_loss
        out.append((names["clipping_loss"], NOT_MEASURED if c is None else c.verdict(),
                    "" if c is None else f" ({c.difference:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}], "
                    f"p {p_text(c.p_bootstrap)})"))
    return out


def in_short(track: Track, results: TrackResults, names: dict[str, str]) -> str:
    named = named_verdicts(track, results, names)
    measured = [(claim, v, e) for claim, v, e in named if v != NOT_MEASURED]
    if not measured:
        recorded = sum(len(row.runs) for row in results.rows)
        return fill(prose.IN_SHORT2, tested=len(named), title=track.title, sentences="",
                    measured=fill(prose.NONE_MEASURED2, recorded=recorded, planned=track.planned(results.names)))
    counts = Counter(v for _, v, _ in measured)
    return fill(prose.IN_SHORT2, tested=len(named), title=track.title,
                measured=fill(prose.MEASURED2, count=len(measured), are="is" if len(measured) == 1 else "are",
                              counts=", ".join(f"{n} {v}" for v, n in counts.items())),
                sentences="".join(fill(prose.SENTENCE2, claim=claim, verdict=v, evidence=e)
                                  for claim, v, e in measured))


# ---- the section --------------------------------------------------------------------------------------------------

@dataclass
class TrackNotRunSection:
    """A track whose pilot found no regime: its result is the pilot's curve, and its main rows are not run."""

    title: str
    folder: str
    main_table: str
    sizes: str
    recorded: str
    template: ClassVar[Template] = prose.RESULTS2_NOT_RUN


def track_section(page, task: str) -> TrackResultsSection | TrackNotRunSection | None:
    study2 = page.study2
    tracks = study2.tracks if study2 is not None else []
    track = next((t for t in tracks if t.task == task and not t.superseded), None)
    if track is None:
        return None
    if not study2.runs_main_rows(track):
        pilot = track.tagged(PILOT)
        main = [n for n in track.experiments if n not in pilot]
        recorded = [f"`{n}` seed{'s' if len(track.runs[n]) > 1 else ''} {', '.join(map(str, sorted(track.runs[n])))}"
                    for n in main if track.runs[n]]
        return TrackNotRunSection(title=track.title, folder=str(track.folder), main_table=MAIN_TABLE[task],
                                  sizes=sizes_list([size_ses(s) for s in study2.regime(track).sizes]),
                                  recorded=fill(prose.NOT_RUN_RECORDED, runs="; ".join(recorded)) if recorded else "")
    results = study2.track_results(track)
    names = claim_names(track, results)
    missing = track.missing(results.names)
    generation = ""
    if track.generation:
        limit = flag_value(load_evaluations(track.folder)[track.generation], "--limit")
        generation = fill(prose.RESULTS2_GENERATION, evaluation=track.generation,
                          turns=fill(prose.FIRST_TURNS, limit=limit) if limit else "every test turn")
    columns = prose.COLUMNS_CONVAI2 if task == CONVAI2 else prose.COLUMNS_COMMONSENSE
    method_unit = prose.UNIT_CONVAI2 if task == CONVAI2 else prose.UNIT_COMMONSENSE
    return TrackResultsSection(
        title=track.title, folder=str(track.folder), main_table=MAIN_TABLE[task],
        paper_table=MAIN_TABLE[task].replace("table", "Table "), generation=generation,
        missing=fill(prose.NOT_YET_RECORDED, missing="; ".join(missing)) if missing else prose.ALL_RECORDED,
        in_short=in_short(track, results, names), table=results_table(track, results),
        columns=fill(columns, costs=prose.COLUMNS_COSTS),
        method=fill(prose.METHOD2, unit=method_unit, resamples=f"{RESAMPLES:,}", seed=BOOTSTRAP_SEED, alpha=ALPHA,
                    generated=prose.GENERATED_UNTESTED if task == CONVAI2 else ""),
        comparisons=comparisons_table(track, results), claims=claims_list(track, results, names),
        generated=generated_table(results), table10=table10_text(track, results), costs=costs_text(results),
        figure2=figure2_text(results), clipping=clipping_text(results), figures=figures_text(page, track))


def convai2(page) -> TrackResultsSection | None:
    """ConvAI2's results (the paper's Table 4), None without Study II or without a ConvAI2 track."""
    return track_section(page, CONVAI2)


def commonsense(page) -> TrackResultsSection | None:
    """Commonsense's results under option likelihood (the paper's Table 3), None without such a track."""
    return track_section(page, COMMONSENSE)

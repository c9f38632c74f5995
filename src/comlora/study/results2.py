"""Study II's results per track (issue 26 items 3 and 5), each computed once from the recorded runs: the results
table's rows, and the claims, each a set of paired comparisons with a verdict (statistics.verdict).

Rows play roles (ROLES), found from each experiment's resolved TrainConfig, not from its name or label. Two rows A
and B are paired over the seeds both have recorded, on the test items both were scored on (every run of a track is
scored on the same items; any difference is refused):
  ConvAI2: per test turn, nll_i(X) = the turn's summed NLL averaged over X's seeds, T_i its tokens;
    d_i = nll_i(B) - nll_i(A), Δ = Σ d_i / Σ T_i nats per token (> 0: A better), SE = sd(d) √n / Σ T_i;
  commonsense: per item, c_i(X) = its acc_norm correctness averaged over X's seeds; d_i = c_i(A) - c_i(B),
    Δ = 100 mean(d) points, SE = 100 sd(d) / √n;
and the 95% interval and two-sided p of Δ come from statistics.paired_bootstrap over the items (ConvAI2: of
d_i n / Σ T_i, the token total held fixed). Each common seed's own Δ (Track.against) shows how the seeds vary.
ConvAI2's generated metrics are stored per run only (corpus BLEU and per-run means; no per-turn score), so they are
compared by their values per seed, untested.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from functools import cached_property
from typing import NamedTuple

import numpy as np

from comlora.storage import read_json
from comlora.study.comparisons import LossComparison, figure2_difference, loss_comparison
from comlora.study.statistics import (
    NOT_DISTINGUISHABLE,
    NOT_SUPPORTED,
    SUPPORTED,
    PairedDifference,
    at_least_k_successes,
    chance_verdict,
    paired_accuracy_difference,
    paired_bootstrap,
    paired_nll_difference,
    verdict,
)
from comlora.study.tracks import CONVAI2, PILOT, Track, TrackRun, choices, turns

MAIN_TABLE = {CONVAI2: "table4", "commonsense": "table3"}     # the tag of a track's main table
RESULT_TAGS = ("decide", "clipping")                          # rows of the results table besides the main table's
GENERATED = {"bleu": "BLEU", "meteor": "METEOR", "rouge_l": "ROUGE-L", "bertscore_f1": "BERTScore F1",
             "average": "Average"}                            # ConvAI2's generated metrics shown (0-100)
NOT_MEASURED = "not measured yet"


class Role(NamedTuple):
    """What a row of Study II is, as its resolved TrainConfig says (method None: the base model)."""

    key: str
    label: str
    method: str | None = None
    r: int = 0
    components: int = 0            # ComLoRA's K
    epochs: int = 1
    decide: bool = False           # ComLoRA with method_options.decide_at
    clip: str = "per_group"        # ComLoRA's clip_grad (LoRA's is not looked at: it has one parameter group)

    def matches(self, cfg) -> bool:
        if cfg is None or self.method is None:
            return cfg is None and self.method is None
        same = (cfg.method, cfg.r, cfg.epochs) == (self.method, self.r, self.epochs)
        if self.method != "comlora":
            return same
        return same and (cfg.num_components, bool(cfg.method_options.get("decide_at")), cfg.clip_grad) == (
            self.components, self.decide, self.clip)


ROLES = [Role("base", "Base model"), Role("lora-r8", "LoRA r=8", "lora", 8), Role("lora-r16", "LoRA r=16", "lora", 16),
         Role("main", "ComLoRA (2, 8)", "comlora", 8, 2), Role("k4", "ComLoRA (4, 4)", "comlora", 4, 4),
         Role("decide", "ComLoRA (2, 8), decide_at", "comlora", 8, 2, decide=True),
         Role("lora-r8-2epochs", "LoRA r=8, two epochs", "lora", 8, epochs=2),
         Role("joint", "ComLoRA (2, 8), clip_grad joint", "comlora", 8, 2, clip="joint")]
FOUR = ["lora-r8", "lora-r16", "main", "k4"]                  # the rows the Table 3/4 claims rank
FIGURE_PARTNERS = {"k4": ["lora-r16"], "main": ["lora-r8"], "joint": ["main", "lora-r8"]}   # drawn beside, by role
FIGURE2_ROLES = [(comlora, partners[-1]) for comlora, partners in FIGURE_PARTNERS.items()]    # Figure 2's claim


@dataclass
class ResultRow:
    """One row of a track's results table: its recorded seeds' values (one per run that has the value)."""

    name: str
    label: str
    planned: list[int]
    runs: list[TrackRun]
    primary: list[float]           # ConvAI2: test NLL per token; commonsense: acc_norm averaged over the tasks
    secondary: list[float]         # perplexity; acc
    generated: dict[str, list[float]]   # GENERATED metric -> its values (ConvAI2's runs with a generated evaluation)
    train_hours: list[float]
    passes: list[float]            # base-model passes per training token (records.base_passes_per_token)


@dataclass
class Comparison:
    """A and B paired on the primary metric over their common seeds (the module's docstring)."""

    seeds: list[int]
    items: int
    value_a: float                 # the primary metric over the paired items, each item averaged over the seeds
    value_b: float
    paired: PairedDifference       # Δ (> 0: A better) and its SE
    ci_low: float
    ci_high: float
    p: float
    per_seed: list[float]          # Δ within each common seed

    @property
    def verdict(self) -> str:
        return verdict(self.paired.difference, self.p)

    @property
    def seeds_disagree(self) -> bool:
        """Some common seed has A better and another B better: the item bootstrap does not cover that variation."""
        return any(d > 0 for d in self.per_seed) and any(d < 0 for d in self.per_seed)


@dataclass
class GeneratedComparison:
    """One generated metric of A and B over the common seeds with a generated evaluation (higher is better)."""

    metric: str
    seeds: list[int]
    a: list[float]
    b: list[float]

    @property
    def per_seed(self) -> list[float]:
        return [x - y for x, y in zip(self.a, self.b)]

    @property
    def higher(self) -> int:
        """The seeds in which A is higher."""
        return sum(d > 0 for d in self.per_seed)


@dataclass
class Pair:
    """A claimed A better than B (roles), the experiments playing them, and their comparison once measured."""

    a: str                         # role keys
    b: str
    a_name: str | None             # experiment names (None: no experiment of the track plays the role)
    b_name: str | None
    comparison: Comparison | None
    generated: list[GeneratedComparison]
    missing: list[str]             # what is missing before the comparison: unrecorded runs, or absent roles

    @property
    def verdict(self) -> str:
        return NOT_MEASURED if self.comparison is None else self.comparison.verdict


def combined(verdicts: list[str]) -> str:
    """A claim made of several comparisons: supported when all are; not supported when one has the opposite
    significant; not measured while one is unmeasured; else not distinguishable."""
    if NOT_MEASURED in verdicts or not verdicts:
        return NOT_MEASURED
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return NOT_SUPPORTED if NOT_SUPPORTED in verdicts else NOT_DISTINGUISHABLE


@dataclass
class Claim:
    """A claim tested on a track: its comparisons (A claimed better than B) and the verdict they give together."""

    key: str
    pairs: list[Pair]

    @property
    def verdict(self) -> str:
        return combined([p.verdict for p in self.pairs])


@dataclass
class ComponentScores:
    """Table 10 for one run with every component scored: each component's primary metric on the test items."""

    run: TrackRun
    scores: dict[int, float]
    best: list[int]                # the best component(s) on the test metric (several when tied)
    best_other: int | None         # the best component besides the winner
    against_best_other: Comparison | None     # the winner (A) against it (B), on the test items

    @property
    def winner(self) -> int:
        return self.run.winner["winner"]

    @property
    def winner_is_best(self) -> bool:
        return self.winner in self.best

    @property
    def lowest_loss(self) -> int | None:
        """The component with the lowest validation loss (winner.json's winner_by_loss; None where not recorded)."""
        return self.run.winner.get("winner_by_loss")

    @property
    def chance(self) -> float:
        """The probability that a component picked at random is (tied) best: |best| / K."""
        return len(self.best) / len(self.scores)


@dataclass
class Table10:
    """Table 10's claim over a track's runs with every component scored: the winner is the best component."""

    checks: list[ComponentScores]
    winners_best: int
    p: float                       # P(at least winners_best by chance), each run's chance |best| / K
    verdict: str

    @property
    def lowest_loss_runs(self) -> int:
        """The runs whose winner.json records the lowest-validation-loss component."""
        return sum(c.lowest_loss is not None for c in self.checks)

    @property
    def lowest_loss_best(self) -> int:
        """The runs whose lowest-validation-loss component was a best one."""
        return sum(c.lowest_loss in c.best for c in self.checks)


class TrackResults:
    """A track's results table and claims, each computed once."""

    def __init__(self, track: Track):
        self.track = track
        self.lower_better = track.task == CONVAI2          # test NLL; commonsense's acc_norm is higher-better

    @cached_property
    def names(self) -> list[str]:
        """The results table's experiments (tagged the main table, decide or clipping; not the pilot's), by role."""
        return self.tagged((MAIN_TABLE[self.track.task], *RESULT_TAGS))

    def tagged(self, tags: tuple[str, ...]) -> list[str]:
        """The track's experiments tagged any of ``tags`` and not the pilot, in the order of ROLES (others last)."""
        names = [n for n, e in self.track.experiments.items() if set(tags) & set(e.tables) and PILOT not in e.tables]
        order = {name: i for i, name in enumerate(self.roles.values())}
        return sorted(names, key=lambda n: (order.get(n, len(order)), n))

    @cached_property
    def roles(self) -> dict[str, str]:
        """Role key -> the experiment playing it, among the track's experiments outside the pilot."""
        track, out = self.track, {}
        candidates = [n for n, e in track.experiments.items() if PILOT not in e.tables]
        for role in ROLES:
            found = [n for n in candidates if role.matches(track.config(n))]
            if len(found) > 1:
                raise ValueError(f"{track.folder}: more than one experiment is {role.label}: {found}")
            if found:
                out[role.key] = found[0]
        return out

    def label(self, role: str) -> str:
        name = self.roles.get(role)
        return self.track.experiments[name].label if name else next(r.label for r in ROLES if r.key == role)

    @cached_property
    def rows(self) -> list[ResultRow]:
        return [self.row(name) for name in self.names]

    def row(self, name: str) -> ResultRow:
        track, runs = self.track, self.track.recorded(name)
        values = [track.primary(r) for r in runs]
        generated = {k: [r.generated["metrics"][k] for r in runs
                         if r.generated and r.generated.get("metrics", {}).get(k) is not None] for k in GENERATED}
        return ResultRow(name, track.experiments[name].label, track.experiments[name].seeds, runs,
                         [v[0] for v in values], [v[1] for v in values], generated,
                         [h for r in runs if (h := r.hours("train_seconds")) is not None],
                         [p for r in runs if (p := r.base_passes_per_token()) is not None])

    def compare(self, a: list[TrackRun], b: list[TrackRun]) -> Comparison:
        """A's runs against B's (one per common seed, in the same order), pooled as the module's docstring says."""
        track = self.track
        for run in a[1:] + b:
            track.against(run, a[0])                       # refuses runs scored on other items
        per_seed = [track.against(x, y).difference for x, y in zip(a, b)]
        if track.task == CONVAI2:
            maps = [[turns(r) for r in runs] for runs in (a, b)]
            keys = sorted(maps[0][0])
            tokens = np.array([maps[0][0][k][1] for k in keys], dtype=np.float64)
            nll_a, nll_b = ([statistics.mean(m[k][0] for m in side) for k in keys] for side in maps)
            paired = paired_nll_difference(nll_b, nll_a, tokens)
            d = (np.asarray(nll_b) - np.asarray(nll_a)) * len(keys) / tokens.sum()
            value_a, value_b = sum(nll_a) / tokens.sum(), sum(nll_b) / tokens.sum()
        else:
            maps = [[choices(r) for r in runs] for runs in (a, b)]
            keys = sorted(maps[0][0], key=str)
            c_a, c_b = (np.array([statistics.mean(float(m[k][0]) for m in side) for k in keys]) for side in maps)
            paired = paired_accuracy_difference(c_a, c_b)
            d = 100 * (c_a - c_b)
            value_a, value_b = 100 * c_a.mean(), 100 * c_b.mean()
        low, high, p = paired_bootstrap(d)
        return Comparison([r.seed for r in a], len(keys), float(value_a), float(value_b), paired, low, high, p,
                          per_seed)

    def pair(self, a: str, b: str) -> Pair:
        """Role ``a`` against role ``b`` over the seeds both have (Pair)."""
        track = self.track
        names = [self.roles.get(a), self.roles.get(b)]
        absent = [f"no experiment is {self.label(role)}" for role, name in zip((a, b), names) if name is None]
        if absent:
            return Pair(a, b, *names, None, [], absent)
        seeds = sorted(set(track.runs[names[0]]) & set(track.runs[names[1]]))
        if not seeds:
            return Pair(a, b, *names, None, [], track.missing(names) or ["no seed recorded for both"])
        runs = [[track.runs[n][s] for s in seeds] for n in names]
        return Pair(a, b, *names, self.compare(*runs), self.generated(*runs), track.missing(names))

    def generated(self, a: list[TrackRun], b: list[TrackRun]) -> list[GeneratedComparison]:
        """Each GENERATED metric over the common seeds where both runs have it; runs that generated for other test
        turns are refused."""
        both = [(x, y) for x, y in zip(a, b) if x.generated and y.generated]
        for x, y in both:
            if [(i["dialogue"], i["turn"]) for i in x.generated["items"]] != [
                    (i["dialogue"], i["turn"]) for i in y.generated["items"]]:
                raise ValueError(f"{x.generated_file} and {y.generated_file}: not the same test turns")
        out = []
        for key in GENERATED:
            have = [(x, y) for x, y in both if None not in (x.generated["metrics"].get(key),
                                                             y.generated["metrics"].get(key))]
            if have:
                out.append(GeneratedComparison(key, [x.seed for x, _ in have],
                                               [x.generated["metrics"][key] for x, _ in have],
                                               [y.generated["metrics"][key] for _, y in have]))
        return out

    @cached_property
    def claims(self) -> dict[str, Claim]:
        """The claims tested on every track: ComLoRA (2, 8) beats LoRA r=8 and r=16 (main); ComLoRA (4, 4) comes
        second among the four (second); the early decision keeps the quality (decide: decide_at against the full
        run, > 0: the early decision better); the compute-matched control (compute); per-group clipping against
        joint (clipping, where the track has a joint row)."""
        claims = {"main": [("main", "lora-r8"), ("main", "lora-r16")],
                  "second": [("main", "k4"), ("k4", "lora-r8"), ("k4", "lora-r16")],
                  "decide": [("decide", "main")], "compute": [("main", "lora-r8-2epochs")]}
        if "joint" in self.roles:
            claims["clipping"] = [("main", "joint")]
        return {key: Claim(key, [self.pair(a, b) for a, b in pairs]) for key, pairs in claims.items()}

    @cached_property
    def order(self) -> list[tuple[str, float]]:
        """The four rows of the main claims with a recorded run, best first by the mean of the primary metric over
        their recorded seeds."""
        rows = {r.name: r for r in self.rows}
        means = [(role, statistics.mean(rows[name].primary)) for role in FOUR
                 if (name := self.roles.get(role)) in rows and rows[name].primary]
        return sorted(means, key=lambda x: x[1], reverse=not self.lower_better)

    def passes(self, role: str) -> float | None:
        """The mean base-model passes per training token of the role's recorded runs (None: none has them)."""
        row = next((r for r in self.rows if r.name == self.roles.get(role)), None)
        return statistics.mean(row.passes) if row and row.passes else None

    @cached_property
    def table10(self) -> Table10 | None:
        """Table 10's claim over the recorded runs of experiments tagged table10 with a winner.json and two or more
        component files; None before any."""
        track = self.track
        checks = [self.components(run) for name in track.tagged("table10") for run in track.recorded(name)
                  if run.winner and len(run.component_files) > 1]
        if not checks:
            return None
        k = sum(c.winner_is_best for c in checks)
        p = at_least_k_successes(k, [c.chance for c in checks])
        return Table10(checks, k, p, chance_verdict(p))

    def components(self, run: TrackRun) -> ComponentScores:
        """Each component's test metric, the best, and the winner against the best other component."""
        results = {k: replace(run, result=read_json(f), result_file=f) for k, f in run.component_files.items()}
        winner = run.winner["winner"]
        if winner not in results or results[winner].result_file != run.result_file:
            raise ValueError(f"{run.path}: winner.json names component {winner}, but the loglik file of the winner is "
                             f"{run.result_file.name}")
        scores = {k: self.track.primary(r)[0] for k, r in results.items()}
        pick = min if self.lower_better else max
        top = pick(scores.values())
        others = [k for k in scores if k != winner]
        other = pick(others, key=scores.__getitem__) if others else None
        return ComponentScores(run, scores, [k for k, v in scores.items() if v == top], other,
                               None if other is None else self.compare([results[winner]], [results[other]]))

    @cached_property
    def figure_experiments(self) -> list[tuple[str, list[str]]]:
        """The track's experiments tagged figures (not the pilot's), each with the experiments FIGURE_PARTNERS draws
        beside it."""
        role_of = {name: role for role, name in self.roles.items()}
        return [(n, [self.roles[r] for r in FIGURE_PARTNERS.get(role_of.get(n), []) if r in self.roles])
                for n in self.tagged(("figures",))]

    @cached_property
    def figure2(self) -> list[tuple[str, str, LossComparison | None]]:
        """Figure 2's claim per pair of FIGURE2_ROLES whose experiments the track has: (ComLoRA role, LoRA role,
        loss_comparison over their common seeds, None before a seed has training steps in both)."""
        out = []
        for comlora, lora in FIGURE2_ROLES:
            if comlora in self.roles and lora in self.roles:
                out.append((comlora, lora, self.loss_pair(comlora, lora)))
        return out

    def loss_pair(self, a: str, b: str, step_difference=figure2_difference) -> LossComparison | None:
        """comparisons.loss_comparison of role ``a``'s runs and role ``b``'s over their common seeds (blocks of
        ``a``'s window), None before a seed has training steps in both."""
        track = self.track
        names = [self.roles[a], self.roles[b]]
        seeds = sorted(set(track.runs[names[0]]) & set(track.runs[names[1]]))
        if not seeds:
            return None
        runs = [[track.runs[n][s] for s in seeds] for n in names]
        return loss_comparison(*runs, runs[0][0].window, step_difference)

    @cached_property
    def clipping_loss(self) -> LossComparison | None:
        """The components' training loss at each step, joint minus per-group clipping (> 0: per-group lower), over
        their common seeds; None without a joint row or before a seed has steps in both."""
        if "joint" not in self.roles or "main" not in self.roles:
            return None
        return self.loss_pair("main", "joint", components_gap)


def components_gap(per_group_step: dict, joint_step: dict) -> float:
    """The mean of the components' training losses at one step, joint run minus per-group run."""
    if "component_loss" not in joint_step:
        raise ValueError(f"step {joint_step.get('step')} of the joint run has no component_loss")
    return statistics.mean(joint_step["component_loss"]) - statistics.mean(per_group_step["component_loss"])

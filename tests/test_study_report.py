"""The study report: its statistics against hand computations, and the page against values recomputed here from
recorded runs (a real tiny-model study, and hand-written records with designed item correctness)."""

import collections
import itertools
import json
import math
import re
import statistics
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_text_model, write_commonsense_root

import comlora.study.experiments as study_module
from comlora.cli import main
from comlora.study.cells import p_text
from comlora.study.comparisons import Paired, loss_comparison
from comlora.study.experiments import run_study
from comlora.study.records import (
    TASKS,
    RecordedRun,
    answer_habits,
    fixed_answer_accuracy,
    load_paper,
    uniform_choice_accuracy,
)
from comlora.study.report import write_report
from comlora.study.statistics import at_least_k_successes, block_bootstrap, paired_bootstrap, sign_test

PAPER = "experiments/study/paper-numbers.json"


# ---- statistics -------------------------------------------------------------------------------------

def test_sign_test_known_values():
    assert sign_test(9, 1) == pytest.approx(2 * (1 + 10) / 1024)                  # 0.021484375
    assert sign_test(1, 9) == sign_test(9, 1)
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(3, 12) == pytest.approx(2 * (1 + 15 + 105 + 455) / 2 ** 15)     # 0.03515625
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(400, 300) == pytest.approx(0.000182, rel=0.02)                  # large n: normal approximation
    with pytest.raises(ValueError, match=">= 0"):
        sign_test(-1, 3)


def test_sign_test_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for wins, losses in [(0, 1), (2, 7), (13, 20), (60, 41)]:
        assert sign_test(wins, losses) == pytest.approx(stats.binomtest(wins, wins + losses).pvalue, rel=1e-9)


def test_at_least_k_successes_by_enumeration_and_binomial():
    chances = [0.5, 0.25, 1 / 3, 0.5]
    for k in range(6):       # every outcome of the four trials, its probability summed where it has >= k successes
        exact = sum(math.prod(p if hit else 1 - p for p, hit in zip(chances, outcome))
                    for outcome in itertools.product([0, 1], repeat=4) if sum(outcome) >= k)
        assert at_least_k_successes(k, chances) == pytest.approx(exact, abs=1e-15)
    assert at_least_k_successes(3, [0.5] * 3) == 0.125 and at_least_k_successes(3, [0.25] * 3) == 1 / 64
    assert at_least_k_successes(4, [0.3] * 9) == pytest.approx(sum(math.comb(9, j) * 0.3 ** j * 0.7 ** (9 - j)
                                                                   for j in range(4, 10)))
    assert at_least_k_successes(0, []) == 1.0 and at_least_k_successes(1, []) == 0.0


def test_paired_bootstrap_against_exact_enumeration():
    d = np.array([1.0, 1.0, 0.0, 1.0])
    # all 4^4 equally likely resamples: the exact distribution of the resampled mean
    means = np.array([d[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)])
    # = P(all four draws are the 0) = 1/256
    exact_p = np.mean(np.abs(means - d.mean()) >= d.mean())
    assert exact_p == pytest.approx(1 / 256)
    low, high, p = paired_bootstrap(d, resamples=10_000, seed=0)
    # P(mean = 0) = 1/256 < 2.5% < P(mean <= 0.25); P(mean = 1) = 81/256
    assert (low, high) == (0.25, 1.0)
    assert abs(p - exact_p) < 4 * math.sqrt(exact_p * (1 - exact_p) / 10_000) + 1e-4


def test_paired_bootstrap_edge_cases_and_normal_limit():
    assert paired_bootstrap(np.zeros(5)) == (0.0, 0.0, 1.0)                          # no difference: p = 1
    low, high, p = paired_bootstrap(np.ones(7), resamples=999)
    assert (low, high, p) == (1.0, 1.0, 1 / 1000)                                    # never as far as 0: p = 1/(B+1)
    d = np.random.default_rng(3).choice([-1.0, 0.0, 1.0], size=800, p=[0.2, 0.65, 0.15])
    low, high, p = paired_bootstrap(d)
    se = d.std() / math.sqrt(d.size)
    normal_p = math.erfc(abs(d.mean()) / se / math.sqrt(2))                          # two-sided z-test
    assert p == pytest.approx(normal_p, abs=0.02)
    assert low == pytest.approx(d.mean() - 1.96 * se, abs=0.01)
    assert high == pytest.approx(d.mean() + 1.96 * se, abs=0.01)
    assert paired_bootstrap(d) == (low, high, p)                                     # fixed seed: reproducible
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([])


def test_chance_fixed_answer_and_answer_habits_by_hand():
    """BoolQ: answers t t f t (one fixed answer: 3/4; uniform pick among 2: 1/2), predictions t, none, t, f (most
    common: t, 2/4; none 1/4). Every other task: one item, answer and prediction 'a' (100, 100, 100, 0)."""
    def items(answers, predictions):
        return {"items": [{"answer": a, "prediction": p} for a, p in zip(answers, predictions)]}

    result = {"tasks": {task: items(["a"], ["a"]) for task, _ in TASKS}}
    result["tasks"]["boolq"] = items(["true", "true", "false", "true"], ["true", None, "true", "false"])
    assert fixed_answer_accuracy(result) == {task: 75.0 if task == "boolq" else 100.0 for task, _ in TASKS}
    assert uniform_choice_accuracy(result) == {task: 50.0 if task == "boolq" else 100.0 for task, _ in TASKS}
    same, none = answer_habits(result)
    assert same == pytest.approx((50 + 7 * 100) / 8) and none == pytest.approx(25 / 8)


def test_figure2_loss_comparison_by_hand(tmp_path):
    """Steps 1-2: LoRA 1.1, 1.0; components [1.0, 1.2], [0.8, 0.9]: d = 1.1 - 1.2, 1.0 - 0.9 = -0.1, +0.1."""
    def run(name, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return RecordedRun(experiment=name, seed=0, path=tmp_path / name, record={}, config=None, parameters=None,
                           winner=None, decision=None, evals={})

    lora = run("lora", [{"step": 1, "lm": 1.1, "target_tokens": 5}, {"step": 2, "lm": 1.0, "target_tokens": 7}])
    comlora = run("comlora", [{"step": 1, "component_loss": [1.0, 1.2], "target_tokens": 5},
                              {"step": 2, "component_loss": [0.8, 0.9], "target_tokens": 7}])
    c = loss_comparison([comlora], [lora], block=1)
    assert (c.seeds, c.steps, c.every_lower) == ([0], 2, 1)
    assert c.difference == pytest.approx(0.0, abs=1e-12) and c.per_seed == [pytest.approx(0.0, abs=1e-12)]
    other = run("other-batches", [{"step": 1, "lm": 1.1, "target_tokens": 6}])
    with pytest.raises(ValueError,
                       match="step 1 has 5 and 6 target tokens; the runs did not train on the same batches"):
        loss_comparison([comlora], [other], block=1)
    assert loss_comparison([run("no-metrics", [])], [lora], block=1) is None        # nothing to compare: no verdict


def test_figure2_leaves_out_the_steps_skipped_for_a_non_finite_loss(tmp_path):
    """A skipped step (metrics.jsonl "skipped": true, its losses written as null) updated no weight: Figure 2's d_t
    leaves it out, as the figures do (plots.read_metrics); steps 1-2 as in the test above, d = -0.1, +0.1."""
    def run(name, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return RecordedRun(experiment=name, seed=0, path=tmp_path / name, record={}, config=None, parameters=None,
                           winner=None, decision=None, evals={})

    lora = run("lora", [{"step": 1, "lm": 1.1}, {"step": 2, "lm": None, "skipped": True}, {"step": 3, "lm": 1.0}])
    comlora = run("comlora", [{"step": 1, "component_loss": [1.0, 1.2]},
                              {"step": 2, "component_loss": [None, 0.7], "skipped": True},
                              {"step": 3, "component_loss": [0.8, 0.9]}])
    c = loss_comparison([comlora], [lora], block=1)
    assert (c.steps, c.every_lower) == (2, 1) and c.difference == pytest.approx(0.0, abs=1e-12)


def test_an_interval_that_rounds_to_zero_is_printed_plus_zero():
    c = Paired(seeds=[0], items=800, accuracy_a=35.0, accuracy_b=35.04, difference=-0.04, ci_low=-1.06, ci_high=0.96,
               p_bootstrap=0.9, a_better=10, b_better=10, p_sign=1.0)
    assert c.interval() == "+0.0 [-1.1, +1.0]"


def test_block_bootstrap_constant_series_exact_and_wider_than_items_when_steps_are_dependent():
    low, high, p = block_bootstrap([[-0.05] * 7, [-0.05] * 5], block=3)             # every resample has mean -0.05
    assert (round(low, 12), round(high, 12), p) == (-0.05, -0.05, 1 / 10_001)
    trend = np.concatenate([np.full(20, 1.0), np.full(20, -0.6)])                    # neighbouring steps alike
    iid_low, iid_high, _ = paired_bootstrap(trend)
    block_low, block_high, _ = block_bootstrap([trend], block=10)
    assert block_high - block_low > 1.5 * (iid_high - iid_low)
    one_low, one_high, _ = block_bootstrap([trend], block=1)                         # blocks of 1: the item bootstrap
    assert one_high - one_low == pytest.approx(iid_high - iid_low, rel=0.1)
    with pytest.raises(ValueError, match="non-empty series and a block of >= 1"):
        block_bootstrap([[]], block=2)


def test_verdict_rule():
    def paired(difference, p):
        return Paired(seeds=[0], items=10, accuracy_a=0, accuracy_b=0, difference=difference, ci_low=0, ci_high=0,
                      p_bootstrap=p, a_better=0, b_better=0, p_sign=1)

    assert paired(2.0, 0.01).verdict() == "supported"
    assert paired(-2.0, 0.01).verdict() == "not supported (the opposite is significant)"
    assert paired(-2.0, 0.01).verdict(paper_sign=-1) == "supported"
    assert paired(5.0, 0.05).verdict() == "not distinguishable at this scale"
    assert paired(-5.0, 0.2).outcome("A", "B") == "not distinguishable at this scale"
    assert paired(-5.0, 0.001).outcome("A", "B") == "B better"


# ---- the paper's numbers ----------------------------------------------------------------------------

def test_paper_numbers_are_consistent_and_map_to_study_experiments():
    from comlora.study.experiments import load_experiments

    paper = load_paper(__import__("pathlib").Path(PAPER))
    _, experiments = load_experiments("experiments/study")
    tables = {e.name: e.tables for e in experiments}
    for name, table in paper["tables"].items():
        for row in table["rows"]:
            assert sum(row["tasks"]) / 8 == pytest.approx(row["average"], abs=0.01), (name, row["row"])
            if row["experiment"]:
                assert name in tables[row["experiment"]], (name, row["experiment"])
    for claim in paper["claims"]:
        assert claim["table"] in tables[claim["better"]] and claim["table"] in tables[claim["than"]]


def test_paper_numbers_are_the_papers():
    from pathlib import Path

    text_file = Path("../shared/papers/comlora-iclr2025-camera-ready.txt")
    if not text_file.is_file():
        pytest.skip("the paper's text is not on this machine")
    lines = [re.sub(r"</?[bu]>", "", line).split("\t") for line in text_file.read_text().splitlines()]
    numbers = [[float(c) for c in cells[-9:]] for cells in lines if len(cells) >= 9 and
               all(re.fullmatch(r"\d+\.\d+", c.strip()) for c in cells[-9:])]
    paper = json.loads(Path(PAPER).read_text())
    for table in paper["tables"].values():
        for row in table["rows"]:
            assert row["tasks"] + [row["average"]] in numbers, row["row"]


# ---- a real tiny-model study ------------------------------------------------------------------------

def write_tiny_study(folder, model, root):
    folder.mkdir()
    base = dict(model=str(model), data_root=str(root), data_seed=0, train_per_task=4, val_size=4, eval_size=2,
                batch_size=4, grad_accum=1, lr=0.01, save_every=0, window=2, device="cpu", retain_cpu_memory=False)
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    selector = {"selector_heads": 4, "selector_ffn_dim": 32}
    experiments = {
        "t3-base-model": {"label": "Base model", "tables": ["table3"], "seeds": [0], "train": None},
        "t3-lora-r8": {"label": "LoRA r=8", "tables": ["table3", "decide"], "seeds": [0, 1],
                       "train": {"method": "lora", "r": 4}},
        "t3-lora-r16": {"label": "LoRA r=16", "tables": ["table3"], "seeds": [0, 1],
                        "train": {"method": "lora", "r": 8}},
        "t3-comlora-k2-r8": {"label": "ComLoRA (2, 8)", "tables": ["table3", "table5", "table10", "figures", "decide"],
                             "seeds": [0, 1], "components": "all",
                             "train": {"method": "comlora", "num_components": 2, "r": 4, "method_options": selector}},
        "t5-without-pairwise": {"label": "without L_pairwise", "tables": ["table5"], "seeds": [0], "components": "all",
                                "train": {"method": "comlora", "num_components": 2, "r": 4,
                                          "method_options": {**selector, "pairwise_loss": False}}},
        "decide-0.5": {"label": "decide_at 0.5", "tables": ["decide"], "seeds": [0], "components": "all",
                       "train": {"method": "comlora", "num_components": 2, "r": 4,
                                 "method_options": {**selector, "decide_at": 0.5}}},
    }
    for name, values in experiments.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"priority": 1, **values}))
    return folder


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The study runner on a tiny model, each `comlora` command run in this process (one thread: the machine is
    shared) instead of a subprocess; lora r=16 and lora r=8 seed 1 are left unrecorded."""
    tmp = tmp_path_factory.mktemp("tiny-study")
    model, root = make_tiny_text_model(tmp), write_commonsense_root(tmp / "data")
    folder = write_tiny_study(tmp / "study", model, root)

    def run_command(argv, log, threads=None, elapsed=None):   # in-process: torch.set_num_threads(1) below
        started = time.perf_counter()
        main(argv)
        seconds = time.perf_counter() - started
        if elapsed is not None:                         # the runner's timing, as experiments.run_command reports it
            elapsed(seconds)
        return seconds

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMLORA_DATA", str(root))
        patch.setattr(study_module, "run_command", run_command)
        torch.set_num_threads(1)
        try:
            run_study(folder, tmp / "work", tmp / "results", max_runs=6,
                      only=["t3-base-model", "t3-lora-r8", "t3-comlora-k2-r8", "t5-without-pairwise", "decide-0.5"])
        finally:
            torch.set_num_threads(threads)
    page = write_report(folder, tmp / "results", tmp / "docs" / "reproduction.md", tmp / "docs" / "figures", PAPER)
    return {"folder": folder, "results": tmp / "results", "page": page, "text": page.read_text()}


def table_rows(text, header_start):
    """The rows (lists of cells) of the markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def section(text, title):
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def item_accuracy(result, task):
    items = result["tasks"][task]["items"]
    return 100 * sum(i["correct"] for i in items) / len(items)


def expected_mean_std(values):
    return f"{values[0]:.1f}" if len(values) == 1 else f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def expected_cells(runs):
    """Mean ± sample std over seeds of each task's accuracy (recomputed from the items) and of their average."""
    per_task = [[item_accuracy(r, t) for r in runs] for t, _ in TASKS]
    return [expected_mean_std(v) for v in per_task] + [
        expected_mean_std([statistics.mean(t[i] for t in per_task) for i in range(len(runs))])]


def winner_eval(run_dir):
    files = sorted((run_dir / "eval").glob("commonsense-*.json"))
    chosen = [f for f in files if "-winner" in f.name] or files
    return json.loads(chosen[0].read_text())


def test_report_of_a_real_tiny_study_counts_runs_and_names_the_missing(tiny_study):
    text = tiny_study["text"]
    assert "**6 of 9 planned runs recorded**" in text
    commit = json.loads((tiny_study["results"] / "t3-lora-r8" / "seed-0" / "run.json").read_text())["commit"]
    assert f"All recorded runs ran at commit `{commit}`" in text
    table3 = section(text, "## Table 3 analogue")
    assert "Not yet recorded: `t3-lora-r8` seed 1; `t3-lora-r16` seeds 0, 1." in table3
    verdicts = {row[0]: row for row in table_rows(text, "| claim of the paper")}
    assert verdicts["ComLoRA (2, 8) beats LoRA r=16 (the same LoRA parameter count)"][-1] == \
        "not measured yet (missing: `t3-lora-r16` seeds 0, 1)"
    assert "(no experiment file)" in verdicts["K=2 beats K=4"][-1]
    assert verdicts["ComLoRA (2, 8) beats LoRA r=8"][6] == "0 (one seed)"           # the only seed both have
    assert "No experiment of the study is tagged table6." in text


def test_report_table3_matches_the_recorded_files(tiny_study):
    results = tiny_study["results"]
    rows = {row[0]: row for row in table_rows(tiny_study["text"], "| method | seeds | L/S %")}
    for name, label in [("t3-comlora-k2-r8", "ComLoRA (2, 8)"), ("t3-lora-r8", "LoRA r=8"),
                        ("t3-base-model", "Base model")]:
        seeds = sorted(results.glob(f"{name}/seed-*"))
        runs = [winner_eval(s) for s in seeds]
        row = rows[label]
        assert row[1] == str(len(seeds)) and row[3:] == expected_cells(runs)
        params_file = seeds[0] / "parameters.json"
        if params_file.is_file():
            p = json.loads(params_file.read_text())
            assert row[2] == f"{100 * p['adapter'] / p['base']:.2f}/{100 * p['router'] / p['base']:.2f}"
        else:
            assert row[2] == "–"
    assert rows["LoRA r=16"][1] == "0" and rows["LoRA r=16"][-1] == "–"
    assert rows["↳ *paper: ComLoRA K=2, r=8*"][-1] == "*87.09*"                      # the paper's row beside ours
    assert "The base model is evaluated with one seed: nothing is trained and decoding is greedy" in tiny_study["text"]

    # against chance and one fixed answer, recomputed from the items of every recorded run
    first = winner_eval(sorted(results.glob("t3-base-model/seed-*"))[0])
    tasks = [first["tasks"][task]["items"] for task, _ in TASKS]
    uniform = statistics.mean(100 / len({i["answer"] for i in items}) for items in tasks)
    fixed = statistics.mean(100 * max(collections.Counter(i["answer"] for i in items).values()) / len(items)
                            for items in tasks)
    habits = {row[0]: row for row in table_rows(tiny_study["text"], "| method | seeds | average | Δ vs random pick")}
    assert set(habits) == {"Base model", "LoRA r=8", "ComLoRA (2, 8)"}                # LoRA r=16 has no run
    for name, label in [("t3-comlora-k2-r8", "ComLoRA (2, 8)"), ("t3-lora-r8", "LoRA r=8")]:
        runs = [winner_eval(s) for s in sorted(results.glob(f"{name}/seed-*"))]
        average = statistics.mean(r["average"] for r in runs)
        same = [statistics.mean(100 * max(collections.Counter(i["prediction"] for i in r["tasks"][t]["items"]).values())
                                / r["tasks"][t]["n"] for t, _ in TASKS) for r in runs]
        assert habits[label][3:6] == [f"{average - uniform:+.1f}", f"{average - fixed:+.1f}", expected_mean_std(same)]

    # Table 5: the one-seed ablation is compared with the full run's seed 0, which gets its own row
    table5 = {row[0]: row for row in table_rows(section(tiny_study["text"], "### Table 5"), "| run | seeds | BoolQ")}
    assert table5["ComLoRA (2, 8) (full)"][1] == "2"
    assert table5["ComLoRA (2, 8) (full), seed 0"][1:] == [
        "1", *expected_cells([winner_eval(results / "t3-comlora-k2-r8" / "seed-0")])]


def test_report_table10_figures_and_early_decision(tiny_study):
    text, results, page = tiny_study["text"], tiny_study["results"], tiny_study["page"]
    rows = table_rows(text, "| run | seed | component |")
    # MAIN, then by name
    runs = [("ComLoRA (2, 8)", "t3-comlora-k2-r8", 0), ("ComLoRA (2, 8)", "t3-comlora-k2-r8", 1),
            ("decide_at 0.5", "decide-0.5", 0), ("without L_pairwise", "t5-without-pairwise", 0)]
    assert [r[:2] for r in rows] == [[label, str(seed)] for label, _, seed in runs for _ in range(2)]
    checks = table_rows(text, "| run | seed | K | winner |")
    assert [c[-1] for c in checks] == ["yes", "yes", "no: an ablation", "no: an ablation"]
    winners = []
    for (label, name, seed), check in zip(runs, checks):
        winner = json.loads((results / name / f"seed-{seed}" / "winner.json").read_text())
        mine = [r for r in rows if r[:2] == [label, str(seed)]]
        assert [r[2] for r in mine] == [f"{k}{' **(winner)**' if k == winner['winner'] else ''}" for k in range(2)]
        assert [r[-1] for r in mine] == [f"{v:.4f}" for v in winner["val_loss"]]
        evals = {k: json.loads(p.read_text()) for k in range(2)
                 for p in (results / name / f"seed-{seed}" / "eval").glob(f"*-component{k}*.json")}
        best = max(e["average"] for e in evals.values())
        winners.append(evals[winner["winner"]]["average"] == best)
        assert check[2:8] == ["2", str(winner["winner"]), str(winner["winner_by_similarity"]),
                              str(winner["winner_by_loss"]),
                              ", ".join(str(k) for k in range(2) if evals[k]["average"] == best),
                              "yes" if winners[-1] else "no"]
    # the claim pools the two runs in it, each with chance |best| / 2 of a random pick being best
    chances = [(c[6].count(",") + 1) / 2 for c in checks[:2]]
    p = at_least_k_successes(sum(winners[:2]), chances)
    assert ("(2 runs of 1 experiment; the ablations' components, where evaluated, are shown in Table 10 but not "
            f"counted): the winner was the best (or tied best) component in {sum(winners[:2])} of 2") in text
    assert f"P(at least {sum(winners[:2])} of 2 by chance) = {p_text(p)}:" in text
    leads = []                          # the winner's accuracy minus the best other component's, over all items
    for seed in (0, 1):
        evals = {k: json.loads(p.read_text()) for k in range(2)
                 for p in (results / "t3-comlora-k2-r8" / f"seed-{seed}" / "eval").glob(f"*-component{k}*.json")}
        winner = json.loads((results / "t3-comlora-k2-r8" / f"seed-{seed}" / "winner.json").read_text())["winner"]
        flags = {k: [i["correct"] for t, _ in TASKS for i in e["tasks"][t]["items"]] for k, e in evals.items()}
        leads.append(100 * (np.mean(flags[winner]) - np.mean(flags[1 - winner])))
    lead_text = [f"{round(x, 1) + 0.0:+.1f}" for x in (min(leads), max(leads))]
    assert f"The winner's lead over the best other component was {lead_text[0]} to {lead_text[1]} points" in text
    for seed in (0, 1):
        for figure in (2, 3):
            png = page.parent / "figures" / f"figure{figure}-seed{seed}.png"
            assert png.read_bytes()[:4] == b"\x89PNG" and f"](figures/figure{figure}-seed{seed}.png)" in text
    figures = section(text, "## Figures 2 and 3")
    assert "Seed 0: Figure 2 (training loss of each component, beside LoRA r=8)" in figures
    assert "Seed 1: Figure 2 (training loss of each component)" in figures          # LoRA seed 1 is not recorded

    def metrics(name, seed):
        lines = (results / name / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    # Figure 2's claim, by hand: the seed both have, LoRA's loss minus the highest component's at each step
    d = np.array([lora["lm"] - max(comlora["component_loss"])
                  for comlora, lora in zip(metrics("t3-comlora-k2-r8", 0), metrics("t3-lora-r8", 0))])
    figure2 = {row[0]: row for row in table_rows(text, "| ComLoRA | LoRA |")}["ComLoRA (2, 8)"]
    low, high, p2 = block_bootstrap([d], 2)                                         # blocks of the window, 2 steps
    expected = "not distinguishable at this scale" if p2 >= 0.05 else \
        "supported" if d.mean() > 0 else "not supported (the opposite is significant)"
    assert figure2[1:] == ["LoRA r=8", "0 (one seed)", f"{np.sum(d > 0)} of {d.size}",
                           f"{d.mean():+.3f} [{low:+.3f}, {high:+.3f}]", f"{d.mean():+.3f}", p_text(p2),
                           f"**{expected}**"]
    norms = {name: statistics.median(s["grad_norm"] for s in metrics(name, 0))
             for name in ("t3-comlora-k2-r8", "t3-lora-r8")}
    assert (f"metrics.jsonl): ComLoRA (2, 8) {norms['t3-comlora-k2-r8']:.2f} against LoRA r=8 "
            f"{norms['t3-lora-r8']:.2f}. "
            "Every step clips the whole gradient, the selector's and the components' together, to norm 1 (") in text
    # Figure 3's claim, by hand, over the two runs of Table 10's claim (window 2: the last window is the last 1-2 steps)
    hits, chances = 0, []
    for seed in (0, 1):
        lowest = [s["lowest_loss_component"] for s in metrics("t3-comlora-k2-r8", seed)]
        last = collections.Counter([lowest[i:i + 2] for i in range(0, len(lowest), 2)][-1])   # Figure 3's last bar
        dominant = [k for k in last if last[k] == max(last.values())]
        winner = json.loads((results / "t3-comlora-k2-r8" / f"seed-{seed}" / "winner.json").read_text())["winner"]
        hits += winner in dominant
        chances.append(len(dominant) / 2)
    assert (f"in the last window of steps in {hits} of 2 runs; by chance a component is so with probability "
            f"|most often| / K in each run ({', '.join(f'{c:.2f}' for c in chances)}), so P(at least {hits} of 2) = "
            f"{p_text(at_least_k_successes(hits, chances))}") in text

    decide = {row[0]: row for row in table_rows(text, "| run | seeds | average accuracy | decided at step")}
    assert list(decide) == ["LoRA r=8", "decide_at 0.5", "ComLoRA (2, 8)"]
    run = json.loads((results / "decide-0.5" / "seed-0" / "run.json").read_text())
    decision = json.loads((results / "decide-0.5" / "seed-0" / "decision.json").read_text())
    assert decide["decide_at 0.5"][3] == f"{decision['decided_at_step']} of {run['steps']}"
    assert decide["decide_at 0.5"][4] == f"{run['train_seconds']:.0f}"
    assert decide["decide_at 0.5"][5] == f"{run['tokens_per_s']:.0f}"
    # by hand: both components run the base model on the decided_at_step steps before the decision, one after it
    steps = [json.loads(line)
             for line in (results / "decide-0.5" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    tokens = [s["target_tokens"] for s in steps]
    before = sum(n for s, n in zip(steps, tokens) if s["step"] <= decision["decided_at_step"])
    assert 0 < before < sum(tokens)
    assert decide["decide_at 0.5"][6] == f"{(2 * before + sum(tokens) - before) / sum(tokens):.2f}"
    assert decide["LoRA r=8"][6] == "1.00" and decide["ComLoRA (2, 8)"][6] == "2.00 ± 0.00"
    # by hand: the median step time up to the decision step (both components) and after it (the winner alone)
    competing = float(np.median([s["step_seconds"] for s in steps if s["step"] <= decision["decided_at_step"]]))
    alone = float(np.median([s["step_seconds"] for s in steps if s["step"] > decision["decided_at_step"]]))
    assert decide["decide_at 0.5"][7] == f"{competing:.1f} / {alone:.1f}"
    assert decide["decide_at 0.5"][8] == f"{alone / competing:.2f}"
    lora = [json.loads(line)["step_seconds"]
            for line in (results / "t3-lora-r8" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert decide["LoRA r=8"][7] == f"– / {float(np.median(lora)):.1f}" and decide["LoRA r=8"][8] == "–"
    assert decide["ComLoRA (2, 8)"][7].endswith(" / –") and decide["ComLoRA (2, 8)"][8] == "–"
    short = section(text, "## In short")
    assert "- decide_at 0.5 against LoRA r=8: " in short
    assert f"at {decide['decide_at 0.5'][6]} passes per token." in short


def test_report_on_an_empty_results_folder_lists_every_run_as_missing(tmp_path):
    page = write_report("experiments/study", tmp_path / "none", tmp_path / "reproduction.md", tmp_path / "figures")
    text = page.read_text()
    assert re.search(r"\*\*0 of \d+ planned runs recorded\*\*", text)
    verdicts = table_rows(text, "| claim of the paper")
    assert len(verdicts) == 15 and all(row[-1].startswith("not measured yet (missing: `") for row in verdicts)
    claims = ("19 tests of the paper's claims here (15 paired comparisons of accuracy, Table 10's count of winners, "
              "Figure 2's claim on training loss (ComLoRA (4, 4) against LoRA r=16 and ComLoRA (2, 8) against LoRA "
              "r=8) and Figure 3's count of winners)")
    assert f"Of the {claims}, none is measured yet." in section(text, "## In short")
    assert f"without a correction for multiple comparisons: of the {claims}, about one in 20" in text
    figure2 = table_rows(text, "| ComLoRA | LoRA |")
    assert [row[-1] for row in figure2] == [
        "**not measured yet (missing: `t3-comlora-k4-r4` seeds 0, 1, 2; `t3-lora-r16` seeds 0, 1, 2)**",
        "**not measured yet (missing: `t3-comlora-k2-r8` seeds 0, 1, 2; `t3-lora-r8` seeds 0, 1, 2)**"]
    assert "The paper's Figure 3 claim (one component gradually gains dominance, having the lowest training loss " \
           "most often, and ends as the winner; tested here: its last part): not measured yet" in text
    assert "Not yet recorded: `t3-base-model` seed 0; `t3-lora-r8` seeds 0, 1, 2;" in text
    assert not (tmp_path / "figures").exists()


def test_study_report_command_line(tmp_path, capsys):
    main(["study-report", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "page.md"),
          "--figures", str(tmp_path / "fig")])
    assert "written:" in capsys.readouterr().out
    assert "comlora study-report --experiments experiments/study" in (tmp_path / "page.md").read_text()
    with pytest.raises(SystemExit):
        main(["study-report", "--paper", str(tmp_path / "absent.json"), "--out", str(tmp_path / "x.md")])
    assert "the paper's numbers are missing" in capsys.readouterr().err


# ---- hand-written records with designed correctness ------------------------------------------------

ITEMS = 20          # per task


def eval_result(correct: np.ndarray) -> dict:
    """A `comlora eval` commonsense result whose items (ITEMS per task, in TASKS order) have these correct flags."""
    tasks = {}
    for t, (task, _) in enumerate(TASKS):
        flags = [bool(c) for c in correct[t * ITEMS:(t + 1) * ITEMS]]
        items = [{"index": 100 + i, "answer": "answer1", "response": "the correct answer is answer1" if c else "",
                  "prediction": "answer1" if c else None, "correct": c} for i, c in enumerate(flags)]
        tasks[task] = {"accuracy": 100 * sum(flags) / len(flags), "n": len(flags), "items": items}
    return {"settings": {"num_beams": 1}, "tasks": tasks,
            "average": statistics.mean(t["accuracy"] for t in tasks.values()), "seconds": 1.0}


def write_run(results, experiment, seed, evals, commit="aaaa1111", load=1.0, train_seconds=100.0, winner=None,
              params=(80, 0)):
    folder = results / experiment / f"seed-{seed}"
    (folder / "eval").mkdir(parents=True)
    for name, result in evals.items():
        (folder / "eval" / f"commonsense-{name}.json").write_text(json.dumps(result))
    (folder / "config.yaml").write_text(yaml.safe_dump({"window": 2}))
    components = len(evals) if winner is not None else 0
    with (folder / "metrics.jsonl").open("w") as f:
        for step in range(1, 7):
            row = {"step": step, "lm": 3.0 - 0.1 * step, "tokens_per_s": 1000.0, "target_tokens": 10 + step}
            if components:
                row["component_loss"] = [3.0 - 0.1 * step + 0.05 * k for k in range(components)]
                row["lowest_loss_component"] = 0
            f.write(json.dumps(row) + "\n")
    (folder / "parameters.json").write_text(json.dumps({"adapter": params[0], "router": params[1], "base": 10_000,
                                                        "mergeable": True}))
    if winner is not None:
        (folder / "winner.json").write_text(json.dumps(winner))
    (folder / "run.json").write_text(json.dumps({
        "experiment": experiment, "label": experiment, "seed": seed, "commit": commit,
        "date": f"2026-01-0{seed + 1} 10:00:00",
        "cpus": 2, "load_average_start": [load, load, load], "commands": [], "eval_flags": ["--greedy"],
        "train_seconds": train_seconds, "eval_seconds": 450.0, "tokens_per_s": 1000.0, "steps": 50,
        "load_average_end": [load, load, load]}))


@pytest.fixture(scope="module")
def designed(tmp_path_factory):
    """ComLoRA 70% correct, LoRA r=8 30%, LoRA r=16 identical to ComLoRA, without selector 95% (3 seeds each);
    ComLoRA's seed 2 at another commit; LoRA r=8 under a much higher load."""
    tmp = tmp_path_factory.mktemp("designed")
    folder = tmp / "study"
    folder.mkdir()
    (folder / "base.yaml").write_text(yaml.safe_dump({"eval_size": ITEMS, "window": 2}))
    specs = {"t3-lora-r8": ("LoRA r=8", ["table3", "decide"], {"method": "lora", "r": 8}),
             "t3-lora-r16": ("LoRA r=16", ["table3"], {"method": "lora", "r": 16}),
             "t3-comlora-k2-r8": ("ComLoRA (2, 8)", ["table3", "table5", "table10", "decide"],
                                  {"method": "comlora", "num_components": 2, "r": 8}),
             "t5-without-selector": ("without selector", ["table5"], {"method": "comlora", "num_components": 2, "r": 8,
                                                                      "method_options": {"use_selector": False,
                                                                                         "align_loss": False,
                                                                                         "pairwise_loss": False}})}
    for name, (label, tables, train) in specs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"label": label, "tables": tables, "seeds": [0, 1, 2],
                                                             "components": "all" if "table10" in tables else "winner",
                                                             "train": train}))
    rng = np.random.default_rng(0)
    n = ITEMS * len(TASKS)
    correct = {}
    results = tmp / "results"
    for seed in range(3):
        main_flags = rng.random(n) < 0.7
        other = rng.random(n) < 0.4                     # the losing component
        correct[("t3-comlora-k2-r8", seed)] = main_flags
        correct[("t3-lora-r8", seed)] = rng.random(n) < 0.3
        correct[("t3-lora-r16", seed)] = main_flags
        correct[("t5-without-selector", seed)] = rng.random(n) < 0.95
        winner = {"winner": 1, "winner_by_similarity": 1, "winner_by_loss": 0, "similarity": [0.1, 0.9],
                  "val_loss": [0.5, 0.6], "num_samples": 8, "decided_at_step": None}
        write_run(results, "t3-comlora-k2-r8", seed, {"run-component0": eval_result(other),
                                                      "run-component1-winner": eval_result(main_flags)},
                  commit="bbbb2222" if seed == 2 else "aaaa1111", winner=winner, params=(160, 40))
        write_run(results, "t3-lora-r8", seed, {"run": eval_result(correct[("t3-lora-r8", seed)])}, load=9.0)
        write_run(results, "t3-lora-r16", seed, {"run": eval_result(main_flags)})
        write_run(results, "t5-without-selector", seed,
                  {"run-component0-winner": eval_result(correct[("t5-without-selector", seed)])})
    page = write_report(folder, results, tmp / "reproduction.md", tmp / "figures", PAPER)
    return {"text": page.read_text(), "correct": correct}


def test_designed_records_table3_and_paired_comparison(designed):
    text, correct = designed["text"], designed["correct"]
    rows = {row[0]: row for row in table_rows(text, "| method | seeds | L/S %")}
    for name, label in [("t3-comlora-k2-r8", "ComLoRA (2, 8)"), ("t3-lora-r8", "LoRA r=8")]:
        assert rows[label][3:] == expected_cells([eval_result(correct[(name, s)]) for s in range(3)])
    assert rows["ComLoRA (2, 8)"][2] == "1.60/0.40"

    main = np.mean([correct[("t3-comlora-k2-r8", s)] for s in range(3)], axis=0)    # per item, over the 3 seeds
    lora = np.mean([correct[("t3-lora-r8", s)] for s in range(3)], axis=0)
    paired = {row[0]: row for row in table_rows(text, "| LoRA row |")}
    row = paired["LoRA r=8"]
    assert row[1:3] == ["0, 1, 2", str(main.size)]
    assert row[3] == f"{100 * main.mean():.1f} vs {100 * lora.mean():.1f}"
    assert row[4].startswith(f"{100 * (main - lora).mean():+.1f} [")
    assert row[6] == f"{np.sum(main > lora)} / {np.sum(main < lora)}"
    assert row[7] == "< 0.0001" and row[8] == "ComLoRA better"
    assert paired["LoRA r=16"][4] == "+0.0 [+0.0, +0.0]" and paired["LoRA r=16"][5] == "1.0000"


def test_designed_records_verdicts_table10_commits_and_load(designed):
    text = designed["text"]
    verdicts = {row[0]: row[-1] for row in table_rows(text, "| claim of the paper")}
    assert verdicts["ComLoRA (2, 8) beats LoRA r=8"] == "**supported**"
    assert (verdicts["ComLoRA (2, 8) beats LoRA r=16 (the same LoRA parameter count)"]
            == "**not distinguishable at this scale**")
    assert (verdicts["the selector matters: removing it lowers accuracy"]
            == "**not supported (the opposite is significant)**")

    ablation = {row[0]: row for row in table_rows(text, "| run | seeds | Δ points [95% CI]")}
    without = ablation["without selector"]                                          # Δ = this row − full
    assert without[2].startswith("+") and without[5] == "-8.12"                     # 75.44 − 83.56 in the paper
    assert without[6] == "not supported (the opposite is significant)"

    checks = {row[1]: row for row in table_rows(text, "| run | seed | K | winner |")}
    assert set(checks) == {"0", "1", "2"}
    for row in checks.values():
        assert row[0] == "ComLoRA (2, 8)" and row[2:6] == ["2", "1", "1", "0"] and row[6] == "1"
        assert row[7] == "yes" and row[8] == "no" and row[10] == "yes"
    assert "(3 runs of 1 experiment; the ablations' components, where evaluated, are shown in Table 10 but not " \
           "counted): the winner was the best (or tied best) component in 3 of 3" in text
    assert "(0.50, 0.50, 0.50), so P(at least 3 of 3 by chance) = 0.1250: **not distinguishable" in text  # 0.5^3
    assert "the component with the lowest validation loss was the best in 0 of 3" in text

    assert "The recorded runs ran at different commits:" in text
    assert "- `bbbb2222`: t3-comlora-k2-r8/seed-2" in text
    assert ("**The recorded load averages differ a lot** (each run's mean of start and end: from 1.0 to 9.0 "
            "on 2 CPUs)") in text
    assert "Not yet recorded" not in section(text, "## Table 3 analogue")
    # 12 x 100 s, 12 x 450 s
    assert "In all, the 12 recorded runs took 0.3 h of training and 1.5 h of evaluation" in text

    # Figure 2: every step, LoRA's loss (3 - 0.1 t) minus the highest component's (3 - 0.1 t + 0.05) is -0.05
    figure2 = {row[0]: row for row in table_rows(text, "| ComLoRA | LoRA |")}
    assert figure2["ComLoRA (2, 8)"][1:] == ["LoRA r=8", "0, 1, 2", "0 of 18", "-0.050 [-0.050, -0.050]",
                                             "-0.050, -0.050, -0.050", "< 0.0001",
                                             "**not supported (the opposite is significant)**"]
    assert figure2["t3-comlora-k4-r4"][-1] == "**not measured yet (missing: `t3-comlora-k4-r4` (no experiment file))**"
    # Figure 3: component 0 always had the lowest loss (last window of 2: steps 5-6), the winner is component 1
    assert "over the 3 runs of Table 10's claim: the selector's winner had the lowest loss most often (or tied most " \
           "often) in the last window of steps in 0 of 3 runs; by chance a component is so with probability " \
           "|most often| / K in each run (0.50, 0.50, 0.50), so P(at least 0 of 3) = 1.0000: **not distinguishable " \
           "at this scale**. The winner's share of the lowest-loss steps rose from the first window to the last in " \
           "0 of 3 runs." in text

    short = section(text, "## In short")                # 6 of the 19 measured, in the order of the claims
    assert "Of the 19 tests of the paper's claims here (15 paired comparisons of accuracy, Table 10's count of " \
           "winners, Figure 2's claim on training loss (t3-comlora-k4-r4 against LoRA r=16 and ComLoRA (2, 8) " \
           "against LoRA r=8) and Figure 3's count of winners), 6 are measured: " \
           "1 supported, 3 not distinguishable at this scale, 2 not supported (the opposite is significant)." in short
    assert "Those with a verdict other than not distinguishable: ComLoRA (2, 8) beats LoRA r=8 — supported; the " \
           "selector matters: removing it lowers accuracy — not supported (the opposite is significant); Figure 2: " \
           "every component of ComLoRA (2, 8) has a lower training loss than LoRA r=8 — not supported (the opposite " \
           "is significant)." in short
    paired = {row[0]: row for row in table_rows(text, "| LoRA row |")}["LoRA r=8"]
    assert f"ComLoRA (2, 8) against LoRA r=8 on the same {paired[2]} items (seeds 0, 1, 2): {paired[3]}, " \
           f"Δ {paired[4]} points, p {paired[5]} (ComLoRA better); training costs 2.00 base-model passes per " \
           "training token against 1.00." in short
    table3 = [statistics.mean(eval_result(designed["correct"][(name, s)])["average"] for s in range(3))
              for name in ("t3-lora-r8", "t3-lora-r16", "t3-comlora-k2-r8")]
    assert ("For scale: a uniform random pick among each task's answers averages 100.0, and answering each task with "
            "its most frequent correct answer 100.0. The trained methods of Table 3 average "
            f"{min(table3):.1f} to {max(table3):.1f}") in short                      # every item's answer is answer1
    averages = [eval_result(designed["correct"][("t3-comlora-k2-r8", s)])["average"] for s in range(3)]
    assert (f"Between training seeds alone, ComLoRA (2, 8) averages {', '.join(f'{a:.1f}' for a in averages)} "
            f"(seeds 0, 1, 2; range {max(averages) - min(averages):.1f} points); the one-seed ablations are compared "
            f"with its seed 0 ({averages[0]:.1f})") in short


def test_a_bad_record_is_named_in_the_error(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "base.yaml").write_text(yaml.safe_dump({"eval_size": ITEMS}))
    (folder / "t3-lora-r8.yaml").write_text(yaml.safe_dump({"label": "LoRA r=8", "tables": ["table3"],
                                                           "train": {"method": "lora", "r": 8}}))
    results = tmp_path / "results"
    flags = np.ones(ITEMS * len(TASKS), dtype=bool)
    write_run(results, "t3-lora-r8", 0, {"run": eval_result(flags), "run-20260101": eval_result(flags)})
    with pytest.raises(ValueError, match=r"seed-0/eval: expected one commonsense evaluation of the run, found"):
        write_report(folder, results, tmp_path / "page.md", tmp_path / "fig", PAPER)
    (results / "t3-lora-r8" / "seed-0" / "eval" / "commonsense-run-20260101.json").unlink()
    (results / "t3-lora-r8" / "seed-0" / "winner.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"seed-0/winner.json: not valid JSON"):
        write_report(folder, results, tmp_path / "page.md", tmp_path / "fig", PAPER)
    assert not (tmp_path / "page.md").exists()

"""Study II's part of the study report (docs/reproduction.md) on hand-written records: the paired statistics against
hand computations, the pilot table, the regime rule (passing, failing, waiting), the cost estimate's arithmetic, the
empty case (Study I's page unchanged) and the refusal of runs scored on other items."""

import json
import math

import pytest
import yaml

from comlora.cli import main
from comlora.study.records import TASKS
from comlora.study.report import write_report
from comlora.study.statistics import paired_accuracy_difference, paired_nll_difference

PAPER = "experiments/study/paper-numbers.json"


# ---- the statistics, by hand --------------------------------------------------------------------------------------

def test_paired_nll_difference_by_hand():
    # d = [3, 3, 1, 2]: sum 9 over 14 tokens; mean 2.25, squared deviations 0.5625 + 0.5625 + 1.5625 + 0.0625 = 2.75,
    # sd = sqrt(2.75 / 3); SE = sd * sqrt(4) / 14
    c = paired_nll_difference([10, 12, 8, 6], [7, 9, 7, 4], [4, 5, 3, 2])
    assert c.difference == pytest.approx(9 / 14)
    assert c.se == pytest.approx(math.sqrt(2.75 / 3) * 2 / 14)
    assert c.standard_errors == pytest.approx((9 / 14) / (math.sqrt(2.75 / 3) * 2 / 14)) and c.n == 4
    worse = paired_nll_difference([7, 9, 7, 4], [10, 12, 8, 6], [4, 5, 3, 2])          # the other way round
    assert worse.difference == pytest.approx(-9 / 14) and worse.se == pytest.approx(c.se)
    with pytest.raises(ValueError, match=">= 2 turns"):
        paired_nll_difference([1.0], [2.0], [3])
    with pytest.raises(ValueError, match="one token count per turn"):
        paired_nll_difference([1.0, 2.0], [2.0, 1.0], [3])


def test_paired_accuracy_difference_by_hand():
    # d = [0, 1, 0, 0, 0, 1]: mean 1/3; squared deviations 4 * 1/9 + 2 * 4/9 = 4/3, sd = sqrt(4/3 / 5)
    c = paired_accuracy_difference([1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 1, 0])
    assert c.difference == pytest.approx(100 / 3)
    assert c.se == pytest.approx(100 * math.sqrt(4 / 15) / math.sqrt(6))
    assert paired_accuracy_difference([1, 1, 1], [0, 0, 0]).standard_errors == math.inf      # SE 0, all better
    assert paired_accuracy_difference([1, 0, 1], [1, 0, 1]).standard_errors == 0.0
    with pytest.raises(ValueError, match=">= 2 items"):
        paired_accuracy_difference([1, 0], [1])


# ---- hand-written records -----------------------------------------------------------------------------------------

def write_yaml(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))


def write_track(folder, task, sizes):
    """A track's base.yaml and its pilot: the base model and LoRA r=8 at ``sizes`` (seed 0)."""
    data = {"convai2": {"data": "convai2", "history_turns": 2},
            "commonsense": {"data": "commonsense-mini", "answer_format": "text"}}[task]
    write_yaml(folder / "base.yaml", {**data, "lr": 0.0003, "evaluations": {"loglik": ["--task", task, "--scoring",
                                                                                       "loglik"]}})
    write_yaml(folder / f"{task}-pilot-base.yaml", {"label": "Base model", "tables": ["pilot"], "train": None})
    for size in sizes:
        size_key = "train_size" if task == "convai2" else "train_per_task"
        write_yaml(folder / f"{task}-pilot-lora-r8-n{size}.yaml",
                   {"label": f"LoRA r=8, {size}", "tables": ["pilot"],
                    "train": {"method": "lora", "r": 8, size_key: size}})


def write_record(results, experiment, task, result, train_seconds=None, eval_seconds=100.0, steps=10):
    folder = results / experiment / "seed-0"
    write_yaml(folder / "config.yaml", {"method": "lora"}) if train_seconds is not None else None
    (folder / "eval" / "loglik").mkdir(parents=True, exist_ok=True)
    (folder / "eval" / "loglik" / f"{task}-loglik-run.json").write_text(json.dumps(result))
    record = {"experiment": experiment, "seed": 0, "eval_seconds": eval_seconds, "steps": steps, "omp_num_threads": "1"}
    if train_seconds is not None:
        record["train_seconds"] = train_seconds
    (folder / "run.json").write_text(json.dumps(record))


def convai2_result(nll, tokens, keys=None):
    keys = keys or [(f"d{i // 2}", i % 2) for i in range(len(nll))]
    items = [{"dialogue": d, "turn": t, "prompt": "p", "response": "r", "nll": x, "tokens": n}
             for (d, t), x, n in zip(keys, nll, tokens)]
    return {"settings": {"scoring": "loglik"}, "n": len(items), "items": items}


def commonsense_result(norm, acc, indexes=(0, 1, 2)):
    """Two tasks of three items: ``norm`` / ``acc`` the correct flags of (boolq's, piqa's) items."""
    tasks = {}
    for t, task in enumerate(("boolq", "piqa")):
        items = [{"index": i, "answer_index": 0, "correct": {"acc": bool(a), "acc_norm": bool(c), "acc_bytes": bool(c)}}
                 for i, c, a in zip(indexes, norm[3 * t:3 * t + 3], acc[3 * t:3 * t + 3])]
        tasks[task] = {"n": 3, "items": items}
    return {"settings": {"scoring": "loglik"}, "tasks": tasks}


BASE_NLL, TOKENS = [10, 12, 8, 6], [4, 5, 3, 2]          # 36 nats over 14 tokens
NLL_N1000 = [7, 9, 7, 4]                                  # d = [3, 3, 1, 2]: 9/14 nats per token, 4.7 SEs
NLL_N3000 = [5, 7, 3, 0.5]                                # d = [5, 5, 5, 5.5]: 20.5/14, sd 0.25, 41.0 SEs
BASE_NORM, BASE_ACC = [1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0]
N200_NORM, N200_ACC = [1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 0]      # d = [0, 1, 0, 0, 0, 1]: 33.3 points, 1.6 SEs
STUDY1_SECONDS = {"t3-lora-r8": [100, 300], "t3-lora-r16": [300], "t3-comlora-k2-r8": [600, 400],
                  "t3-comlora-k4-r4": [700], "decide-0.5": [400], "t3-lora-r8-2epochs": [440]}
RATIOS = {"LoRA r=8": 1.0, "LoRA r=16": 1.5, "ComLoRA (2, 8)": 2.5, "ComLoRA (4, 4)": 3.5,
          "ComLoRA (2, 8), decide_at 0.5": 2.0, "LoRA r=8 at ComLoRA (2, 8)'s training compute": 2.2,
          "ComLoRA (2, 8), clip_grad joint": 2.5}        # mean training seconds ÷ LoRA r=8's 200
EVALUATIONS = {"ComLoRA (2, 8)": 2, "ComLoRA (4, 4)": 4, "ComLoRA (2, 8), clip_grad joint": 2}   # components: all


def write_study1(folder, results):
    """Study I's experiments Study II is costed from, each with its hand-set training seconds."""
    write_yaml(folder / "base.yaml", {"eval_size": 2, "clip_grad": "joint", "max_grad_norm": 1.0})
    trains = {"t3-lora-r8": {"method": "lora", "r": 8}, "t3-lora-r16": {"method": "lora", "r": 16},
              "t3-comlora-k2-r8": {"method": "comlora", "num_components": 2, "r": 8},
              "t3-comlora-k4-r4": {"method": "comlora", "num_components": 4, "r": 4},
              "decide-0.5": {"method": "comlora", "num_components": 2, "r": 8, "method_options": {"decide_at": 0.5}},
              "t3-lora-r8-2epochs": {"method": "lora", "r": 8, "epochs": 2}}
    generated = {"settings": {}, "average": 50.0, "tasks": {
        task: {"accuracy": 50.0, "n": 2, "items": [{"index": i, "answer": "answer1", "response": "", "correct": i == 0,
                                                    "prediction": "answer1" if i == 0 else None} for i in range(2)]}
        for task, _ in TASKS}}
    for name, train in trains.items():
        seconds = STUDY1_SECONDS[name]
        write_yaml(folder / f"{name}.yaml", {"label": name, "tables": ["table3"], "seeds": list(range(len(seconds))),
                                             "components": "all" if "comlora" in name else "winner", "train": train})
        for seed, value in enumerate(seconds):
            run = results / name / f"seed-{seed}"
            (run / "eval").mkdir(parents=True)
            (run / "eval" / "commonsense-run.json").write_text(json.dumps(generated))
            (run / "run.json").write_text(json.dumps({"experiment": name, "seed": seed, "train_seconds": value,
                                                      "eval_seconds": 1.0}))


@pytest.fixture
def folders(tmp_path):
    write_study1(tmp_path / "study", tmp_path / "results")
    write_track(tmp_path / "study2" / "convai2", "convai2", [1000, 3000, 6244])
    write_track(tmp_path / "study2" / "commonsense", "commonsense", [200, 800])
    return tmp_path


def report(tmp, study2=True):
    extra = (tmp / "study2", tmp / "results2") if study2 else (None, None)
    return write_report(tmp / "study", tmp / "results", tmp / "page.md", tmp / "figures", PAPER, "comlora study-report",
                        *extra).read_text()


def part(text, title):
    """The text of the section headed ``title`` up to the next heading of its level or above."""
    start = text.index(title)
    level = title.split(" ")[0]
    ends = [i for i in (text.find(f"\n{h} ", start + 1) for h in ("#", "##", "###")[:len(level)]) if i > 0]
    return text[start:min(ends) if ends else None]


def table(text, header_start):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return {row[0]: row for row in rows}


def record_pilot(results):
    write_record(results, "convai2-pilot-base", "convai2", convai2_result(BASE_NLL, TOKENS), eval_seconds=360)
    write_record(results, "convai2-pilot-lora-r8-n1000", "convai2", convai2_result(NLL_N1000, TOKENS),
                 train_seconds=1200, eval_seconds=720, steps=125)
    write_record(results, "convai2-pilot-lora-r8-n3000", "convai2", convai2_result(NLL_N3000, TOKENS),
                 train_seconds=3600, eval_seconds=720, steps=375)
    write_record(results, "commonsense-pilot-base", "commonsense", commonsense_result(BASE_NORM, BASE_ACC),
                 eval_seconds=180)
    write_record(results, "commonsense-pilot-lora-r8-n200", "commonsense", commonsense_result(N200_NORM, N200_ACC),
                 train_seconds=1200, eval_seconds=360, steps=200)


# ---- the page -----------------------------------------------------------------------------------------------------

def test_nothing_recorded_says_what_is_planned_and_leaves_study1_unchanged(folders):
    study1_only = report(folders, study2=False)
    text = report(folders)
    assert text.startswith(study1_only.rstrip("\n") + "\n\n# Study II: where a 135M model learns\n")
    assert "# Study II" not in study1_only
    assert "**Nothing of Study II is recorded yet**: 7 runs are planned (7 experiments in" in text
    assert "Not yet recorded: `convai2-pilot-base` seed 0; `convai2-pilot-lora-r8-n1000` seed 0;" in text
    regime = part(text, "## Pilot: the regime chosen")
    assert ("- ConvAI2: the choice waits. No size is compared yet; not yet recorded: 1,000 turns, 3,000 turns, "
            "6,244 turns; the base model is not recorded yet.") in regime
    assert ("- Commonsense: the choice waits. No size is compared yet; not yet recorded: 200 per task "
            "(1,600 items), 800 per task (6,400 items); the base model is not recorded yet.") in regime
    estimate = part(text, "## Pilot: the cost of Study II")
    assert estimate.count("No estimate yet: no LoRA r=8 pilot run is recorded.") == 2
    costs = table(estimate, "| Study II row |")
    for label, ratio in RATIOS.items():                  # Study I's relative costs need no Study II record
        assert costs[label][4] == f"{ratio:.2f}" and costs[label][5] == str(EVALUATIONS.get(label, 1))
    assert costs["LoRA r=8"][2:4] == ["0, 1", "200"]
    clipping = part(text, "## Clipping")
    assert ("Study I clipped the whole gradient, the selector's and the components' together, to norm 1.0 (`"
            f"{folders / 'study' / 'base.yaml'}`: clip_grad joint, max_grad_norm 1.0). Study II clips each parameter "
            "group (the adapter or the components; the selector or router) to norm 1.0 on its own") in clipping
    assert "ComLoRA (4, 4) against LoRA r=16 is confounded by rank" in clipping


def test_pilot_table_regime_and_estimate_by_hand(folders):
    record_pilot(folders / "results2")
    text = report(folders)
    assert "**5 of 7 planned runs recorded**" in text
    convai2 = table(part(text, "### ConvAI2 (`"), "| run | seed | training items | test NLL per token")
    assert convai2["Base model"] == ["Base model", "0", "0", f"{36 / 14:.4f}", f"{math.exp(36 / 14):.2f}", "–", "–",
                                     "–", "0.10", "10"]
    se = math.sqrt(2.75 / 3) * 2 / 14
    assert convai2["LoRA r=8, 1000"] == ["LoRA r=8, 1000", "0", "1,000", f"{27 / 14:.4f}", f"{math.exp(27 / 14):.2f}",
                                         f"+{9 / 14:.4f} ± {se:.4f}", f"{9 / 14 / se:.1f}", "0.33", "0.20", "125"]
    assert convai2["LoRA r=8, 3000"][5:7] == [f"+{20.5 / 14:.4f} ± {0.25 * 2 / 14:.4f}", "41.0"]
    assert "Scored on 4 test turns (14 reply tokens, EOS included)." in text
    commonsense = table(part(text, "### Commonsense (`"), "| run | seed | training items | acc_norm")
    se = 100 * math.sqrt(4 / 15) / math.sqrt(6)
    assert commonsense["LoRA r=8, 200"] == ["LoRA r=8, 200", "0", "1,600", f"{200 / 3:.1f}", "50.0",
                                            f"+{100 / 3:.1f} ± {se:.1f}", f"{100 / 3 / se:.1f}", "0.33", "0.10", "200"]
    assert commonsense["Base model"][3:5] == [f"{100 / 3:.1f}", "16.7"]                  # piqa's acc: 0 of 3

    regime = part(text, "## Pilot: the regime chosen")    # 1,000 turns fails (4.7 SEs), 3,000 passes
    assert (f"- **ConvAI2: 3,000 turns** (`convai2-pilot-lora-r8-n3000`): Δ +{20.5 / 14:.4f} nats per token, 41.0 "
            "paired SEs ≥ 10; the cheaper sizes do not pass: 1,000 turns (4.7 paired SEs).") in regime
    assert ("- Commonsense: the choice waits. Recorded: 200 per task (1,600 items) (1.6 paired SEs); "
            "none passes yet; not yet recorded: 800 per task (6,400 items).") in regime

    # ConvAI2 at its chosen 3,000 turns: 1 h of LoRA r=8 training and 0.2 h of evaluation per run; the base 0.1 h
    estimate = part(text, "## Pilot: the cost of Study II")
    assert "### ConvAI2 at 1,000 turns" not in estimate
    rows = table(part(estimate, "### ConvAI2 at 3,000 turns (the pilot's LoRA r=8: 1.00 h training, 0.20 h "
                               "evaluation, OMP_NUM_THREADS 1)"), "| row | seeds |")
    assert rows["Base model"][1:] == ["1", "0.00", "0.10"]
    for label, ratio in RATIOS.items():
        assert rows[label][1:] == ["3", f"{1.0 * ratio * 3:.2f}", f"{0.2 * EVALUATIONS.get(label, 1) * 3:.2f}"]
    convai2_hours = 3 * sum(RATIOS.values())                                              # 45.6
    convai2_eval_hours = 0.1 + 0.2 * 3 * sum(EVALUATIONS.get(label, 1) for label in RATIOS)     # 7.3
    assert rows["**total**"][2:] == [f"**{convai2_hours:.2f}**", f"**{convai2_eval_hours:.2f}**"]
    commonsense_rows = table(part(estimate, "### Commonsense at 200 per task"), "| row | seeds |")
    assert "ComLoRA (2, 8), clip_grad joint" not in commonsense_rows                      # ConvAI2 only
    commonsense_hours = 1200 / 3600 * 3 * (sum(RATIOS.values()) - RATIOS["ComLoRA (2, 8), clip_grad joint"])
    assert commonsense_rows["**total**"][2] == f"**{commonsense_hours:.2f}**"
    assert (f"ConvAI2 at 3,000 turns: {convai2_hours:.2f} h (over 15 h); Commonsense at 200 per task "
            f"(1,600 items): {commonsense_hours:.2f} h (within 15 h).") in estimate
    assert ("At ConvAI2's chosen size (3,000 turns) and Commonsense's cheapest recorded size (200 per task "
            f"(1,600 items); its choice waits), both tracks together train for "
            f"{convai2_hours + commonsense_hours:.2f} h: over the 30 h, so as the issue says, ConvAI2 runs in full "
            "first and commonsense's rows are trimmed.") in estimate


def test_a_track_where_no_size_passes_leaves_the_study_to_the_other(folders):
    results = folders / "results2"
    record_pilot(results)
    write_yaml(folders / "study2" / "commonsense" / "commonsense-lora-r8.yaml",       # a main row, one seed recorded
               {"label": "LoRA r=8", "tables": ["table3"], "seeds": [0, 1, 2], "train": {"method": "lora", "r": 8}})
    write_record(results, "commonsense-lora-r8", "commonsense", commonsense_result(N200_NORM, N200_ACC),
                 train_seconds=1200)
    text = report(folders)          # convai2: base, 3 sizes; commonsense: base, 2 sizes (800 unrecorded), the main row
    assert "**6 of 10 planned runs recorded**" in text
    assert "## Study II on Commonsense: results" in text and "Study II on Commonsense: not run" not in text
    write_record(results, "commonsense-pilot-lora-r8-n800", "commonsense", commonsense_result(N200_NORM, N200_ACC),
                 train_seconds=7200)
    (results / "convai2-pilot-lora-r8-n3000" / "seed-0" / "run.json").unlink()         # not recorded after all
    write_record(results, "convai2-pilot-lora-r8-n6244", "convai2", convai2_result(NLL_N3000, TOKENS),
                 train_seconds=600, eval_seconds=720)
    text = report(folders)
    regime = part(text, "## Pilot: the regime chosen")
    assert ("- Commonsense: **no size passes**: 200 per task (1,600 items) (1.6 paired SEs), 800 per "
            "task (6,400 items) (1.6 paired SEs). As the issue plans, this track's curve is the pilot table above, "
            "and Study II runs on the other track.") in regime
    assert ("**6 of 7 planned runs recorded** (7 experiments in "                      # the main row not counted
            f"`{folders / 'study2'}`, times their seeds; left out, the main rows of a track whose pilot found no "
            "regime: 1 of Commonsense).") in text
    assert "## Study II on Commonsense: results" not in text
    assert part(text, "## Study II on Commonsense: not run").strip() == (
        "## Study II on Commonsense: not run\n\nNo pilot size passes the regime check (200 per task (1,600 items) "
        "(1.6 paired SEs), 800 per task (6,400 items) (1.6 paired SEs); see \"Pilot: the regime chosen\" above). As "
        "issue 26 plans, this track's result is its pilot curve, and its main rows (the experiments of "
        f"`{folders / 'study2' / 'commonsense'}` tagged table3, decide or clipping) are not run and not counted among "
        "the planned runs. Recorded before the pilot's verdict and left out here: `commonsense-lora-r8` seed 0.")
    assert ("- ConvAI2: the choice waits. 6,244 turns passes (41.0 paired SEs), but a cheaper size is not compared "
            "yet: not yet recorded: 3,000 turns.") in regime
    (results / "convai2-pilot-lora-r8-n1000" / "seed-0" / "run.json").unlink()
    write_record(results, "convai2-pilot-lora-r8-n3000", "convai2", convai2_result(NLL_N3000, TOKENS),
                 train_seconds=600, eval_seconds=720)                                   # 1,000 turns unrecorded now
    regime = part(report(folders), "## Pilot: the regime chosen")
    assert "- ConvAI2: the choice waits. 3,000 turns passes" in regime and "not yet recorded: 1,000 turns." in regime
    write_record(results, "convai2-pilot-lora-r8-n1000", "convai2", convai2_result(NLL_N3000, TOKENS),
                 train_seconds=600, eval_seconds=720)                                   # the cheapest passes: chosen
    text = report(folders)
    assert "- **ConvAI2: 1,000 turns** (`convai2-pilot-lora-r8-n1000`)" in text
    hours = 600 / 3600 * 3 * sum(RATIOS.values())
    assert (f"At ConvAI2's chosen size, the only track that runs, Study II trains for {hours:.2f} h: within the "
            "30 h.") in part(text, "## Pilot: the cost of Study II")


def test_a_superseded_track_is_named_by_its_folder_and_not_costed(folders):
    """A second commonsense track, its experiments tagged superseded (a protocol given up, kept as recorded)."""
    results = folders / "results2"
    record_pilot(results)
    old = folders / "study2" / "commonsense-options"
    write_track(old, "commonsense", [200])
    for path in old.glob("commonsense-*.yaml"):                # experiment names are unique over the tracks
        experiment = yaml.safe_load(path.read_text())
        write_yaml(old / path.name.replace("commonsense-", "old-"), {**experiment, "tables": ["pilot", "superseded"]})
        path.unlink()
    write_record(results, "old-pilot-base", "commonsense", commonsense_result(BASE_NORM, BASE_ACC), eval_seconds=180)
    write_record(results, "old-pilot-lora-r8-n200", "commonsense", commonsense_result(N200_NORM, N200_ACC),
                 train_seconds=1200, eval_seconds=360, steps=200)
    text = report(folders)
    assert "### Commonsense (commonsense-options) (`" in part(text, "## Pilot: each track's training size")
    assert ("- Commonsense (commonsense-options): superseded (its base.yaml says why), its pilot kept as recorded: "
            "200 per task (1,600 items) (1.6 paired SEs). Not costed below.") in part(text, "## Pilot: the regime")
    estimate = part(text, "## Pilot: the cost of Study II")
    assert "commonsense-options" not in estimate and "### Commonsense at 200 per task" in estimate


def test_runs_scored_on_other_items_are_refused(folders):
    results = folders / "results2"
    write_record(results, "convai2-pilot-base", "convai2", convai2_result(BASE_NLL, TOKENS))
    write_record(results, "convai2-pilot-lora-r8-n1000", "convai2", convai2_result(NLL_N1000, [4, 5, 3, 3]),
                 train_seconds=10)
    with pytest.raises(ValueError, match=r"not the same test turns and tokens \(4 and 4 turns, 0 not in both\)"):
        report(folders)
    write_record(results, "convai2-pilot-lora-r8-n3000", "convai2",
                 convai2_result(NLL_N1000, TOKENS, keys=[("d0", 0), ("d0", 1), ("d1", 0), ("d9", 1)]), train_seconds=10)
    (results / "convai2-pilot-lora-r8-n1000" / "seed-0" / "run.json").unlink()
    with pytest.raises(ValueError, match=r"not the same test turns and tokens \(4 and 4 turns, 2 not in both\)"):
        report(folders)
    (results / "convai2-pilot-lora-r8-n3000" / "seed-0" / "run.json").unlink()
    write_record(results, "commonsense-pilot-base", "commonsense", commonsense_result(BASE_NORM, BASE_ACC))
    write_record(results, "commonsense-pilot-lora-r8-n200", "commonsense",
                 commonsense_result(N200_NORM, N200_ACC, indexes=(0, 1, 5)), train_seconds=10)
    with pytest.raises(ValueError, match=r"commonsense-loglik-run.json and .*: not the same items \(6 and 6 items, "
                                         r"4 not in both\)"):
        report(folders)
    assert not (folders / "page.md").exists()


def test_study_report_command_line_names_study2_folders_only_when_not_the_default(folders, capsys):
    args = ["study-report", "--experiments", str(folders / "study"), "--results", str(folders / "results"),
            "--out", str(folders / "page.md"), "--figures", str(folders / "fig"), "--paper", PAPER]
    main(args + ["--study2-experiments", str(folders / "study2"), "--study2-results", str(folders / "none")])
    text = (folders / "page.md").read_text()
    assert f"--study2-experiments {folders / 'study2'} --study2-results {folders / 'none'}`" in text
    assert "**Nothing of Study II is recorded yet**" in text
    main(args)                                            # the defaults: the repository's experiments/study2
    assert "--study2" not in (folders / "page.md").read_text() and "# Study II" in (folders / "page.md").read_text()
    with pytest.raises(SystemExit):
        main(args + ["--study2-experiments", str(folders / "absent")])
    assert "no Study II folder" in capsys.readouterr().err

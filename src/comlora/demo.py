"""The main job (``comlora demo`` / ``make demo``): ComLoRA and LoRA trained the same way on SmolLM2 and
the commonsense-mini suite; base, LoRA and the ComLoRA winner (merged) evaluated on the same items."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from comlora.base_models import load_model_and_tokenizer
from comlora.data.commonsense import build_commonsense_mini
from comlora.data.items import data_root
from comlora.evaluation.commonsense import evaluate_commonsense, markdown_table
from comlora.evaluation.results import write_results
from comlora.plots import plot_loss_curves
from comlora.storage import read_json, write_json, write_text
from comlora.training.config import TrainConfig, load_yaml
from comlora.training.finished_run import reload_method
from comlora.training.loop import train


def run_demo(out: Path, limit: int = 25, config_dir: Path = Path("experiments")) -> dict:
    started = time.perf_counter()
    out = out if not out.exists() else out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    seconds: dict[str, float] = {}
    configs = {}
    for name in ("comlora", "lora"):
        values = load_yaml(config_dir / f"demo-{name}.yaml")
        configs[name] = TrainConfig.from_dict({**values, "out": str(out / name)})
        t = time.perf_counter()
        train(configs[name])
        seconds[f"train {name}"] = time.perf_counter() - t

    cfg = configs["comlora"]
    suite = build_commonsense_mini(data_root(cfg.data_root), cfg.tasks, cfg.eval_size, 0, 0, cfg.split_seed)
    evaluate = lambda model, tokenizer: evaluate_commonsense(  # noqa: E731
        model, tokenizer, suite.evaluation, limit, batch_size=8, max_new_tokens=16, num_beams=1)
    results = {}
    t = time.perf_counter()
    base, tokenizer = load_model_and_tokenizer(cfg.model, device=cfg.device, dtype=cfg.dtype)
    results["base (zero-shot)"] = evaluate(base.eval(), tokenizer)
    del base
    lora, tokenizer, _ = reload_method(out / "lora")
    results[f"LoRA r={configs['lora'].r}"] = evaluate(lora, tokenizer)
    del lora
    comlora, tokenizer, _ = reload_method(out / "comlora")
    winner = comlora.winner
    merged = comlora.merge(winner, inplace=True).eval()
    winner_label = f"ComLoRA K={cfg.num_components} r={cfg.r} winner (component {winner}, merged)"
    results[winner_label] = evaluate(merged, tokenizer)
    seconds["evaluate 3 models"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started

    for label, result in results.items():
        write_results(out / "eval", label.split(" ")[0].lower(), result, markdown_table)
    figure2 = plot_loss_curves({"ComLoRA": out / "comlora", f"LoRA r={configs['lora'].r}": out / "lora"},
                               out / "loss_curves_vs_lora.png")
    table = markdown_table(results)
    winner_report = read_json(out / "comlora" / "winner.json")
    summary = {"command": f"comlora demo --limit {limit} --configs {config_dir}", "date": time.strftime("%Y-%m-%d"),
               "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
               "configs": {name: c.to_dict() for name, c in configs.items()}, "limit_per_task": limit,
               "eval_seed": cfg.split_seed, "seconds": seconds, "winner": winner_report,
               "accuracy": {k: {t: v["tasks"][t]["accuracy"] for t in v["tasks"]} for k, v in results.items()},
               "average_accuracy": {k: v["average"] for k, v in results.items()}}
    write_json(out / "results.json", summary)
    timing = "\n".join(f"- {k}: {v:.0f} s" for k, v in seconds.items())
    write_text(out / "results.md", f"# comlora demo\n\n{table}\nWall time:\n{timing}\n")
    print("\n" + table)
    print(f"winner: component {winner}; selector similarity {winner_report['similarity']}, "
          f"validation loss {winner_report['val_loss']}")
    print(f"wall time: {seconds['total']:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items() if k != 'total')})")
    print(f"plots: {figure2}, {out / 'comlora' / 'lowest_loss_share.png'}")
    print(f"results: {out / 'results.md'}")
    return summary

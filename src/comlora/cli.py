"""The ``comlora`` command line: train, select, export, eval, compare, demo, study, check-data. Methods and evaluation
tasks come from their registries (``methods/registry.py``, ``evaluation/registry.py``)."""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
import traceback
from dataclasses import fields
from functools import partial
from pathlib import Path

import yaml
from safetensors import SafetensorError

from comlora.evaluation.registry import TASKS
from comlora.evaluation.settings import EvalSettings, add_flags, from_flags
from comlora.export.registry import FORMATS as EXPORT_FORMATS
from comlora.methods.registry import METHODS, get_method
from comlora.training.config import TrainConfig, apply_overrides, load_yaml
from comlora.training.processes import MainProcessFailed
from comlora.training.safe_run_dir import RunError, lock_run

STUDY2_EXPERIMENTS, STUDY2_RESULTS = "experiments/study2", "experiments/results/study2"   # study-report's defaults

# What reaches the user as one line "error: ..." and exit code 2 (with --debug, after the traceback): bad values,
# files that are missing, corrupt or cut short, refusals. Anything else is a bug and shows its traceback.
USER_ERRORS = (ValueError, OSError, NotImplementedError, ImportError, RunError, MainProcessFailed, SafetensorError,
               EOFError, pickle.UnpicklingError, yaml.YAMLError)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds '(default: X)' to an option's help where X is a value (not None or False) its help does not state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def field_default(f) -> object:
    return f.default_factory() if callable(f.default_factory) else f.default


def train_flags(f) -> tuple[str, ...]:
    """The flags of TrainConfig field ``f``: its name with hyphens (``--num-components``), or its own ``flags``, the
    first one shown by --help-method (r: ``--rank``, as torchrun reads ``--r`` as an abbreviation of its own options
    even after the module's name; ``--r`` still works without torchrun)."""
    return f.metadata.get("flags", ("--" + f.name.replace("_", "-"),))


def method_option_flags() -> dict[str, object]:
    """{name: field} of the method options with a ``comlora train`` flag of their own (the registry's
    ``option_flags``, e.g. comlora's --top-n); they fill ``method_options``."""
    found = {}
    for method in (m for m in METHODS.values() if m.option_flags):
        own = {f.name: f for f in fields(method.config_class)}
        for name in method.option_flags:
            found.setdefault(name, own[name])
    return found


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``train_flags``) and per method option with a flag (``method_option_flags``,
    parsed into ``method_options.NAME``): its help, allowed values and default from the field. The parsed default is
    None, so that a value from --config or --set is not overridden."""
    options = [(f, f"method_options.{f.name}", " (a method option)") for f in method_option_flags().values()]
    for f, dest, note in [(f, f.name, "") for f in fields(TrainConfig) if f.name != "method_options"] + options:
        common = {"dest": dest, "default": None}
        if dest != f.name and "choices" not in f.metadata:
            common["metavar"] = f.name.upper()        # not METHOD_OPTIONS.TOP_N
        help_text = f.metadata["help"] + f"{note} (default: {field_default(f)})"
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(*train_flags(f), action=argparse.BooleanOptionalAction, help=help_text, **common)
        elif "list" in kind:
            parser.add_argument(*train_flags(f), type=lambda v: [x for x in v.split(",") if x], **common,
                                help=f.metadata["help"] + f" Comma-separated. (default: {field_default(f)})")
        else:
            cast = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(*train_flags(f), type=cast, choices=f.metadata.get("choices"), help=help_text, **common)


def method_help(name: str) -> str:
    """The options of method ``name``: its config's fields with their help and defaults (``comlora train``'s where a
    TrainConfig field fills one), and which train flag fills each (the rest are set as method_options)."""
    method = get_method(name)
    flag_of = {f.name: train_flags(f)[0] for f in [*fields(TrainConfig), *method_option_flags().values()]}
    from_flags = set(flag_of) | ({method.components_field} - {None})
    train_defaults = {f.name: field_default(f) for f in fields(TrainConfig)}
    train_defaults[method.components_field] = train_defaults["num_components"]
    lines = [f"{name}: {method.description} ({method.config_class.__name__}; "
             f"{'mergeable into the base weights' if method.mergeable else 'not mergeable'})", ""]
    for f in fields(method.config_class):
        if f.name in method.fixed:
            continue
        if f.name in from_flags:
            flag = "--num-components" if f.name == method.components_field else flag_of[f.name]
            how = f"train flag {flag}"
        else:
            how = f"--set method_options.{f.name}=VALUE"
        lines.append(f"  {f.name} (default: {train_defaults.get(f.name, field_default(f))}; {how})")
        lines.append(f"      {f.metadata.get('help', '')}")
    own = [f for f in fields(method.config_class) if f.name not in from_flags and f.name not in method.fixed]
    if own:
        example = ", ".join(f"{f.name}: {json.dumps(field_default(f))}" for f in own[:2])
        lines += ["", "In a YAML config the method's own options go under method_options, "
                      f"e.g. method_options: {{{example}}}"]
    return "\n".join(lines)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML file first, then ``--set key=value``, then explicit flags."""
    values = load_yaml(args.config) if args.config else {}
    values = apply_overrides(values, args.set or [])
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    for name in method_option_flags():
        given = getattr(args, f"method_options.{name}", None)
        if given is not None:
            values["method_options"] = {**(values.get("method_options") or {}), name: given}
    return TrainConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> None:
    from comlora.base_models import local_model_folder
    from comlora.training.data import check_data_source

    if args.help_method:
        print(method_help(args.method or train_config_from_args(args).method))
        return
    cfg = train_config_from_args(args)
    local_model_folder(cfg.model)          # a missing --model folder or --data fails here, before torch loads
    check_data_source(cfg)
    from comlora.training.loop import train

    run = train(cfg, resume=args.resume)
    print(f"run finished: {run}")


def cmd_select(args: argparse.Namespace) -> None:
    with lock_run(args.run, "select", optional=args.out is not None):
        select_winner_again(args)


def select_winner_again(args: argparse.Namespace) -> None:
    from comlora.storage import write_json
    from comlora.training.finished_run import reload_method, run_config, run_validation_batches, run_validation_items

    cfg = run_config(Path(args.run))
    if not get_method(cfg.method).selects_winner:
        raise ValueError(f"{args.run} is a {cfg.method} run; winner selection applies to runs of a method whose "
                         f"components compete ({', '.join(n for n, m in METHODS.items() if m.selects_winner)})")
    items = run_validation_items(cfg, args.data)     # read before the model loads
    method, tokenizer, cfg = reload_method(args.run)
    batches = run_validation_batches(cfg, items, tokenizer, method.model.device)
    report = method.select_winner(batches, progress=True)
    name = "winner-reselected" if args.data is None else f"winner-{Path(args.data).stem}"
    out = Path(args.out) if args.out else Path(args.run) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out (nothing was written)")
    write_json(out, report.to_dict())
    print(f"winner: component {report.winner} (similarity {report.similarity}, "
          f"validation loss {report.val_loss}) -> {out}")
    print(f"the run's own winner.json, state/ and adapter/ are unchanged; to export this one: "
          f"comlora export {args.run} --component {report.winner} --out DIR")


def cmd_export(args: argparse.Namespace) -> None:
    export = EXPORT_FORMATS[args.format].export
    with lock_run(args.run, "export", optional=True):
        print(export(args.run, args.out, args.component, args.merge, args.outtype))


def eval_settings(args: argparse.Namespace) -> tuple[EvalSettings, object]:
    """``comlora eval``'s flags as the settings every task shares and the ``Options`` of ``--task``."""
    return from_flags(EvalSettings, args), from_flags(TASKS[args.task].Options, args)


def cmd_eval(args: argparse.Namespace) -> None:
    settings, options = eval_settings(args)
    if not settings.run:
        return evaluate_and_write(settings, options)
    with lock_run(settings.run, "eval", optional=settings.out is not None):   # RUN/eval is the run's
        evaluate_and_write(settings, options)


def evaluate_and_write(settings: EvalSettings, options) -> None:
    """Evaluate every model ``settings`` names on its task (with the task's ``options``) and write each result."""
    from comlora.base_models import resolve_device
    from comlora.cpu_memory import retain_freed_memory
    from comlora.data.items import data_root
    from comlora.evaluation.results import write_results
    from comlora.evaluation.targets import evaluation_targets

    settings = settings.with_run_defaults()
    if settings.retain_cpu_memory and resolve_device(settings.device).type == "cpu":
        retain_freed_memory()
    task = TASKS[settings.task]
    evaluate, table = task.prepare(settings, options, data_root(settings.data_root)), task.markdown_table
    default_out = Path(settings.run) / "eval" if settings.run else Path("eval-results")
    out = Path(settings.out) if settings.out else default_out
    results = {}
    for label, model, tokenizer in evaluation_targets(settings):
        result = evaluate(model, tokenizer)
        result["settings"].update(task=settings.task, model=settings.model, adapter=settings.adapter, run=settings.run,
                                  seed=settings.seed, backend=settings.backend)
        scoring = "-loglik" if settings.scoring == "loglik" else ""
        name = f"{settings.task}{scoring}-{label}" + (f"-limit{settings.limit}" if settings.limit is not None else "")
        if (out / f"{name}.json").exists():         # never overwrite an earlier evaluation
            name += f"-{time.strftime('%Y%m%d-%H%M%S')}"
        write_results(out, name, result, table)
        results[label] = result
    print(table(results))
    print(f"results in {out}/")


def cmd_demo(args: argparse.Namespace) -> None:
    from comlora.demo import run_demo

    run_demo(Path(args.out), limit=args.limit, config_dir=Path(args.configs))


def cmd_compare(args: argparse.Namespace) -> None:
    from comlora.compare import comparison_rows, run_summary, to_csv, to_markdown
    from comlora.storage import write_text

    rows = comparison_rows([run_summary(r) for r in args.runs], tuple(args.group_by.split(",")))
    table = to_markdown(rows)
    print(table)
    if args.out:
        write_text(Path(args.out).with_suffix(".md"), table)
        write_text(Path(args.out).with_suffix(".csv"), to_csv(rows))
        print(f"written: {Path(args.out).with_suffix('.md')} and .csv")


def cmd_check_data(args: argparse.Namespace) -> None:
    from comlora.data.check import check_data_root, format_report
    from comlora.data.items import data_root

    report = check_data_root(data_root(args.data_root))
    print(format_report(report))
    if not report.complete:
        raise SystemExit(1)


def cmd_study(args: argparse.Namespace) -> None:
    from comlora.study.experiments import run_study

    run_study(args.experiments, args.work, args.results, args.only.split(",") if args.only else None, args.max_runs,
              args.jobs)


def cmd_study_report(args: argparse.Namespace) -> None:
    from comlora.study.report import write_report

    study2 = [("--study2-experiments", args.study2_experiments, STUDY2_EXPERIMENTS),   # named only when not the default
              ("--study2-results", args.study2_results, STUDY2_RESULTS)]
    command = " ".join(["comlora", "study-report", "--experiments", args.experiments, "--results", args.results,
                        "--out", args.out, "--figures", args.figures] + (["--paper", args.paper] if args.paper else [])
                       + [part for flag, value, default in study2 if value != default for part in (flag, value)])
    page = write_report(args.experiments, args.results, args.out, args.figures, args.paper, command,
                        args.study2_experiments, args.study2_results)
    print(f"written: {page} (figures in {args.figures}/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comlora",
                                     description="Competitive LoRA fine-tuning (ComLoRA) and baselines.")
    parser.add_argument("--debug", action="store_true", help="On an error, show its full traceback too.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = partial(sub.add_parser, formatter_class=DefaultsHelpFormatter)

    p = sub.add_parser("train", help="Train comlora (or a baseline method) and select, export and plot at the end.")
    p.add_argument("--config", help="YAML file of TrainConfig options (experiments/*.yaml).")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="Override one option (repeatable); "
                   "method_options.NAME=VALUE sets a field of the method's config.")
    p.add_argument("--resume", action="store_true", help="Continue the run in --out from its last checkpoint.")
    p.add_argument("--help-method", action="store_true", help="List the options of --method (" + ", ".join(METHODS)
                   + ") with their help and defaults, and exit.")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("select", help="Re-run ComLoRA winner selection of a finished run.")
    p.add_argument("run", help="Run directory.")
    p.add_argument("--data", help="Another validation set (LLM-Adapters JSON file or folder).")
    p.add_argument("--out", help="Where to write the report (default: a new RUN/winner-reselected-<time>.json, "
                   "or RUN/winner-<data>-<time>.json); the run's winner.json is never overwritten.")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("export", help="Export one component (default: the winner) as a PEFT adapter or a merged model.")
    p.add_argument("run", help="Run directory.")
    p.add_argument("--component", type=int, help="Component index (default: the winner).")
    p.add_argument("--merge", action="store_true", help="Write a merged model (transformers folder, or with --format "
                   "gguf a standalone GGUF model) instead of an adapter.")
    p.add_argument("--format", default="peft", choices=list(EXPORT_FORMATS),
                   help="; ".join(f"{name}: {f.description}" for name, f in EXPORT_FORMATS.items()) + ".")
    p.add_argument("--outtype", help="--format gguf: tensor type of the LoRA adapter (f32 default, f16) or of the "
                   "merged weights (f16 default, f32, q8_0; the base's other tensors are copied as they are).")
    p.add_argument("--out", required=True, help="New (or empty) output folder; with --format gguf a new FILE.gguf.")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="Evaluate a base model, a PEFT adapter or a run's components.")
    add_flags(p, EvalSettings, choices={"task": list(TASKS)})
    for name, task in TASKS.items():            # each task's own options
        add_flags(p.add_argument_group(name), task.Options)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="Table of evaluated runs: params %% (L/S), accuracy per task, average, "
                                       "inference cost.")
    p.add_argument("runs", nargs="+", help="Run directories (each evaluated with `comlora eval --run`).")
    p.add_argument("--group-by", default="method,r,num_components",
                   help="config.yaml keys that define a configuration; "
                        "runs sharing them (e.g. other seeds) give mean ± std.")
    p.add_argument("--out", help="Also write OUT.md and OUT.csv.")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="The main job: train ComLoRA and LoRA on SmolLM2, "
                                    "evaluate base, LoRA and the winner.")
    p.add_argument("--out", default="runs/demo", help="Folder for the demo's runs and results.")
    p.add_argument("--limit", type=int, default=25, help="Evaluation items per task.")
    p.add_argument("--configs", default="experiments", help="Folder holding demo-comlora.yaml and demo-lora.yaml.")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("check-data", help="Check a data root: which files each dataset (commonsense, MMLU, ConvAI2) "
                       "needs, which are missing or unreadable, and which commands that affects (exit 1 if any).")
    p.add_argument("--data-root", help="Data root (default: $COMLORA_DATA or ../shared/data).")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("study", help="The reproduction study: run every experiment of experiments/study "
                                     "not yet recorded.")
    p.add_argument("--experiments", default="experiments/study",
                   help="Folder of experiment YAML files (and base.yaml).")
    p.add_argument("--results", default="experiments/results/study", help="Where each finished run is recorded.")
    p.add_argument("--work", default="runs/study",
                   help="Working run directories (checkpoints; a killed study resumes). Studies started side by "
                   "side on the same folders share the work: each skips the runs another is running.")
    p.add_argument("--only", help="Comma-separated experiment names (file stems) to run.")
    p.add_argument("--max-runs", type=int, help="Stop after this many runs.")
    p.add_argument("--jobs", type=int, default=1,
                   help="Runs at a time, each with OMP_NUM_THREADS = CPUs // jobs unless OMP_NUM_THREADS is set.")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("study-report", help="The reproduction page (tables, paired tests, verdicts, figures) from the "
                       "recorded study runs, beside the paper's numbers.")
    p.add_argument("--experiments", default="experiments/study",
                   help="Folder of experiment YAML files (and base.yaml).")
    p.add_argument("--results", default="experiments/results/study",
                   help="Where `comlora study` recorded the runs (read only).")
    p.add_argument("--out", default="docs/reproduction.md", help="The page to write.")
    p.add_argument("--figures", default="docs/figures/reproduction", help="Folder for the figures' PNG files.")
    p.add_argument("--paper", help="The paper's numbers (default: EXPERIMENTS/paper-numbers.json).")
    p.add_argument("--study2-experiments", default=STUDY2_EXPERIMENTS,
                   help="Study II's folder: one subfolder per track (base.yaml and experiment files).")
    p.add_argument("--study2-results", default=STUDY2_RESULTS,
                   help="Where `comlora study` recorded Study II's runs (read only).")
    p.set_defaults(func=cmd_study_report)
    for command in sub.choices.values():         # --debug also after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="Show an error's traceback.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        if args.debug:
            traceback.print_exc()
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()

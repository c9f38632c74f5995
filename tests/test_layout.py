"""The package layout (docs/architecture.md): no import cycle, training imports no evaluation module, every
registered method and task has what the CLI needs, and the CLI's choices come from the registries."""

import ast
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from comlora.cli import build_parser, method_help
from comlora.evaluation.registry import TASKS
from comlora.methods.adapter_config import AdapterConfig
from comlora.methods.base import AdapterModel
from comlora.methods.registry import METHODS

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """comlora module -> the comlora modules it imports anywhere in its source (lazy imports included, and the
    registries' ``"comlora.module:Class"`` references, which are imported when first used)."""
    modules = {module_name(p): p for p in (SRC / "comlora").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("comlora"):
                candidates = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
                targets.add(next(c for c in candidates if c in modules))
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("comlora."):
                module, colon, _ = node.value.partition(":")
                if colon:
                    assert module in modules, f"{name} names {node.value}: no such module"
                    targets.add(module)
        graph[name] = targets - {name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    cycles = sorted(m for m in graph if m in reachable(graph, m) and m != "comlora")
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_training_and_methods_import_no_evaluation_module():
    graph = import_graph()
    for package in ("comlora.training", "comlora.methods", "comlora.data"):
        for module in (m for m in graph if m.startswith(package)):
            bad = sorted(m for m in reachable(graph, module) if m.startswith(("comlora.evaluation", "comlora.cli")))
            assert not bad, f"{module} reaches {bad}"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_builds_on_the_bases_and_documents_its_fields(name):
    method = METHODS[name]
    assert issubclass(method.config_class, AdapterConfig) and issubclass(method.model_class, AdapterModel)
    assert method.model_class.config_class is method.config_class
    assert isinstance(method.model_class.mergeable, bool) and method.description
    assert all(f.metadata.get("help") for f in fields(method.config_class))
    assert method.components_field is None or method.components_field in {f.name for f in fields(method.config_class)}
    text = method_help(name)
    own = [f.name for f in fields(method.config_class) if f.name not in method.fixed]
    assert all(f"  {field} (default: " in text for field in own)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_brings_its_options_its_evaluation_and_its_table(name):
    task = TASKS[name]
    assert all(callable(getattr(task, f)) for f in ("prepare", "markdown_table"))
    assert is_dataclass(task.Options) and all(f.metadata.get("help") for f in fields(task.Options))


def subcommand(parser, name):
    return next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == name)[1]


def option(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings)


def test_cli_choices_come_from_the_registries():
    parser = build_parser()
    assert list(option(subcommand(parser, "train"), "--method").choices) == list(METHODS)
    assert list(option(subcommand(parser, "eval"), "--task").choices) == list(TASKS)


def test_train_help_shows_each_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.0003)" in text and "(default: commonsense-mini)" in text and "{auto,cpu,cuda,mps}" in text


def test_every_command_help_shows_its_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Beam width (LLM-Adapters: 4). (default: 4)" in text and "(default: transformers)" in text
    assert "{commonsense,mmlu,convai2}" in text

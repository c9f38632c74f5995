"""What ``comlora eval`` evaluates with: ``EvalSettings``, the settings every task shares, and the ``option`` fields
(of EvalSettings and of each task's own ``Options`` dataclass) that become its flags (``add_flags``, ``from_flags``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from comlora.training.config import TrainConfig


def option(default, help_text: str, choices: list | tuple | None = None):
    """A dataclass field that is a ``comlora eval`` flag, ``--name-with-hyphens``: its default, help and allowed
    values."""
    return field(default=default, metadata={"help": help_text, "choices": choices})


def flag_fields(cls) -> list:
    """The fields of dataclass ``cls`` made with ``option``."""
    return [f for f in fields(cls) if "help" in f.metadata]


def add_flags(parser, cls, choices: dict[str, list] | None = None) -> None:
    """One flag per ``option`` field of dataclass ``cls`` (its value in ``args.<field name>``): a bool defaulting to
    False is a switch, one defaulting to True also takes ``--no-...``. ``choices``: a field's allowed values known
    only to the caller (the registry's task names)."""
    for f in flag_fields(cls):
        kind = {"choices": (choices or {}).get(f.name, f.metadata["choices"])}
        if f.type == "bool":
            kind = {"action": argparse.BooleanOptionalAction if f.default else "store_true"}
        else:
            kind["type"] = int if f.type.startswith("int") else float if f.type.startswith("float") else str
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, help=f.metadata["help"],
                            **kind)


def from_flags(cls, args):
    """Dataclass ``cls`` filled from the parsed flags ``args`` that ``add_flags(parser, cls)`` added."""
    return cls(**{f.name: getattr(args, f.name) for f in flag_fields(cls)})


@dataclass(frozen=True)
class EvalSettings:
    """The settings every evaluation task shares (``comlora eval``'s own flags). ``with_run_defaults`` fills what
    ``--run`` decides."""

    model: str = option("smollm2-135m", "Base model (ignored with --run: the run's own).")
    adapter: str | None = option(None, "A PEFT adapter folder to evaluate on --model.")
    run: str | None = option(None, "A run directory to evaluate.")
    components: str = option("winner", "With --run (comlora): all, winner, or an index.")
    task: str = option("commonsense", "Evaluation suite (default: commonsense).")
    limit: int | None = option(None, "commonsense: items per task (first N of the reserved subset); "
                               "mmlu: rows per subject; convai2: examples.")
    seed: int | None = option(None, "Seed of the commonsense subset / the ConvAI2 split (default: the run's data "
                              "seed, else 0).")
    scoring: str = option("generate", "commonsense and convai2: generate answers and score them (the paper's "
                          "protocol), or loglik: score given texts by their log-likelihood (commonsense: each option's "
                          "text, lm-evaluation-harness acc / acc_norm; convai2: the gold reply's NLL per token and "
                          "perplexity). Results go to TASK-loglik-*.json.", choices=["generate", "loglik"])
    greedy: bool = option(False, "Greedy decoding instead of beam search.")
    num_beams: int = option(4, "Beam width (LLM-Adapters: 4).")
    max_new_tokens: int = option(32, "New tokens per answer (LLM-Adapters: 32).")
    backend: str = option("transformers", "llama.cpp: generate with llama-cpp-python on the GGUF base (--model "
                          "smollm2-135m or a .gguf file) with a GGUF --adapter, or a run's LoRA exported to GGUF; "
                          "greedy only, MMLU in generate mode.", choices=["transformers", "llama.cpp"])
    batch_size: int = option(8, "Prompts per generate call (loglik: per forward pass).")
    data_root: str | None = option(None, "Data root (default: $COMLORA_DATA or ../shared/data).")
    device: str = option("auto", "auto, cpu, cuda, ...")
    retain_cpu_memory: bool = option(True, "On a CPU: keep freed memory for reuse instead of returning it to the OS "
                                     "(see train's option).")
    out: str | None = option(None, "Output folder (default RUN/eval or ./eval-results).")
    run_config: TrainConfig | None = None       # --run's config, set by with_run_defaults

    def __post_init__(self):
        if self.adapter and self.run:
            raise ValueError("give --adapter or --run, not both")
        if self.components not in ("all", "winner") and not self.components.isdigit():
            raise ValueError(f"--components must be all, winner or a component index (0, 1, ...), got "
                             f"{self.components!r}")
        if self.scoring == "loglik" and self.backend == "llama.cpp":
            raise ValueError("--scoring loglik runs on the transformers backend: leave out --backend llama.cpp")
        if self.backend == "llama.cpp" and not (self.greedy or self.num_beams == 1):
            raise ValueError("the llama.cpp backend decodes greedily (llama.cpp has no beam search): add --greedy")

    @property
    def effective_num_beams(self) -> int:
        """The beam width generation uses: 1 with --greedy."""
        return 1 if self.greedy else self.num_beams

    def with_run_defaults(self) -> EvalSettings:
        """These settings with ``--run``'s config, its base model and, unless --seed is given, its data seed (the
        commonsense subset must be the run's own held-out items); without a run, seed 0 unless given."""
        if not self.run:
            return replace(self, seed=0 if self.seed is None else self.seed)
        from comlora.training.finished_run import run_config

        config = run_config(Path(self.run))
        return replace(self, run_config=config, model=config.model,
                       seed=config.split_seed if self.seed is None else self.seed)

"""AdapterConfig: the LoRA fields every method's config shares, and their checks. Plain dataclasses (no torch), so
that the configs, TrainConfig and the command line's options load without the model code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from comlora.config_base import ConfigDict

TARGET_MODULES_HELP = ("Linear / Conv1D modules to adapt: a list of name suffixes (PEFT style) or one regex matched "
                       "against the full module name; None = the architecture's default (the paper's q,k,v,up,down "
                       "where the model's names fit, e.g. Llama, Qwen, Mistral, Gemma, Phi-3; otherwise PEFT's "
                       "default for the model type, e.g. c_attn on GPT-2). Resolved against the model when the "
                       "adapter is built.")


@dataclass
class AdapterConfig(ConfigDict):
    """The fields every method's config shares; a method's config adds its own after them."""

    # True for a method whose K components compete and whose result is the one selected (the winner): each component
    # is evaluated on its own (`--components all`) and `comlora select` selects again. Read without the model code.
    selects_winner: ClassVar[bool] = False

    r: int = field(default=8, metadata={"help": "Rank of every LoRA pair A (d_in x r), B (r x d_out)."})
    lora_alpha: float = field(default=16, metadata={
        "help": "LoRA scaling numerator: each update is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input x (0 = off)."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": TARGET_MODULES_HELP})
    seed: int = field(default=0, metadata={"help": "Seed of the adapter's initialisation."})

    def adapter_checks(self, *positive_ints: str) -> list[tuple[bool, str]]:
        """The shared checks: r and the named integer fields >= 1, lora_alpha > 0, lora_dropout in [0, 1),
        target_modules None (the architecture's default) or at least one module (a tuple becomes a list)."""
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        return self.integer_checks(positive_ints + ("r",), 1) + self.integer_checks(["seed"], 0) + [
            (self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}"),
            (0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}"),
            (self.target_modules is None or bool(self.target_modules),
             "target_modules must name at least one module, or be None for the architecture's default"),
        ]

    def check_processes(self, num_processes: int) -> None:
        """Refuse a setting this method cannot train with across ``num_processes`` processes (DDP); any by default."""

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

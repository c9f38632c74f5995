"""TrainConfig: one training run (model, method, data, optimiser, run directory), loadable from YAML."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from comlora.config_base import ConfigDict
from comlora.methods.registry import METHODS

SCHEDULERS = ("linear", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
MIXED_PRECISION = ("no", "bf16", "fp16")
CLIP_GRAD = ("per_group", "joint")
# Fields added after runs were recorded, with the value those runs trained with: a run's config.yaml without the
# field means this value, not today's default (runs.run_config, resuming a run).
EARLIER_RUN_VALUES = {"clip_grad": "joint"}
ANSWER_FORMATS = ("label", "text", "cloze")
# ComLoRA's options that TrainConfig held at its top level before they moved to method_options, with the default
# they had there (recorded config.yaml files and experiment files still load: TrainConfig.from_dict)
FORMER_TOP_LEVEL_OPTIONS = {"top_n": None, "noise_alpha": 0.1, "anneal": "exponential"}


@dataclass
class TrainConfig(ConfigDict):
    """Everything ``comlora train`` needs; the resolved copy is written to ``RUN_DIR/config.yaml``."""

    out: str = field(default="runs/latest", metadata={
        "help": "Run directory (metrics, checkpoints, state, adapter, plots)."})
    model: str = field(default="smollm2-135m", metadata={
        "help": "Base model: 'smollm2-135m' (embedded default), a Hub id or a local path."})
    method: str = field(default="comlora", metadata={"help": "Training method (its own options: --help-method).",
                                                     "choices": METHODS.keys()})   # live: a method registered later too
    num_components: int = field(default=2, metadata={
        "help": "K: competing components (comlora) or experts (moelora, teamlora)."})
    r: int = field(default=8, metadata={"help": "LoRA rank (per component / expert).", "flags": ("--rank", "--r")})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha; the update is scaled by lora_alpha / r."})
    # the training recipe's dropout (LLM-Adapters'), for every method; a method config's own default (0.0) is the
    # library's, for a model built without comlora train
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "Linear modules to adapt (name suffixes); default: the method's own for the architecture "
                "(q,k,v,up,down on Llama-style models, else PEFT's default for the model type; "
                "LoRATRF: o,gate,up,down)."})
    method_options: dict = field(default_factory=dict, metadata={
        "help": "The method's own options: fields of its config dataclass (comlora: top_n, noise_alpha, anneal, "
                "pairwise_detach_lm, ...; `comlora train --method NAME --help-method` lists them)."})
    data: str = field(default="commonsense-mini", metadata={
        "help": "Training data: 'commonsense-mini' (the 8 commonsense tasks, items split per task), 'mmlu' (MMLU's dev "
                "split as instruction items; 'mmlu:test' or 'mmlu:FOLDER' for others), 'convai2' (ConvAI2 dialogue "
                "turns), or a LLM-Adapters JSON file / folder of them."})
    data_root: str | None = field(default=None, metadata={
        "help": "Data root (default: $COMLORA_DATA or ../shared/data)."})
    tasks: list[str] | None = field(default=None, metadata={"help": "commonsense-mini tasks (default: all 8)."})
    train_per_task: int = field(default=25, metadata={"help": "commonsense-mini training items per task."})
    eval_size: int = field(default=100, metadata={
        "help": "commonsense-mini evaluation items reserved per task (never trained on)."})
    val_size: int = field(default=120, metadata={"help": "Validation items for winner selection (the paper's 120)."})
    train_size: int = field(default=0, metadata={"help": "Training items used, drawn at random with the data seed "
                            "from what `data` gives (0 = all); commonsense-mini sizes itself with train_per_task."})
    history_turns: int | None = field(default=None, metadata={
        "help": "ConvAI2 data: earlier turn pairs in each prompt (None = all)."})
    answer_format: str = field(default="label", metadata={
        "help": "Response of commonsense items (commonsense-mini or LLM-Adapters files): 'label', LLM-Adapters' 'the "
                "correct answer is answer3'; 'text', the correct option's text parsed from the instruction, what "
                "`comlora eval --scoring loglik` scores; 'cloze', that text after the question alone (no options "
                "listed, as lm-evaluation-harness prompts), what `--scoring loglik --prompt cloze` scores.",
        "choices": ANSWER_FORMATS})
    cutoff_len: int = field(default=256, metadata={"help": "Maximum tokens per training item (prompt + response)."})
    train_on_inputs: bool = field(default=False, metadata={
        "help": "Also train on the prompt tokens (else they are masked with -100)."})
    lr: float = field(default=3e-4, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler: str = field(default="linear", metadata={
        "help": "Learning-rate decay after warm-up.", "choices": SCHEDULERS})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."})
    clip_grad: str = field(default="per_group", metadata={
        "help": "What max_grad_norm clips: 'per_group' clips each parameter group (the adapter or components; the "
                "router or selector) to max_grad_norm on its own; 'joint' clips every trainable tensor together (the "
                "Trainer's way; Study I), where the selector's much larger gradient sets the factor that scales the "
                "components' gradient. Methods with one group (LoRA) train the same under both.",
        "choices": CLIP_GRAD})
    max_nonfinite_steps: int = field(default=1, metadata={
        "help": "Stop training with an error (exit code 2, the checkpoints kept) once this many consecutive optimizer "
                "steps had a loss or gradient norm that is not finite (NaN or inf); such a step updates no weight. "
                "1 = stop at the first (right for float32 and bfloat16)."})
    epochs: int = field(default=1, metadata={"help": "Epochs over the training items (ignored when max_steps > 0)."})
    max_steps: int = field(default=0, metadata={"help": "Optimizer steps to run; 0 = epochs * steps per epoch."})
    batch_size: int = field(default=8, metadata={"help": "Micro-batch per process."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step."})
    group_by_length: bool = field(default=True, metadata={
        "help": "Batch items of similar length together (less padding; order stays random)."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, initialisation, dropout and noise."})
    data_seed: int | None = field(default=None, metadata={
        "help": "Seed of the data split (commonsense-mini evaluation, training and validation items; other data's "
                "held-out items); None = seed. Fix it to train several seeds on the same items."})
    save_every: int = field(default=0, metadata={
        "help": "Checkpoint every N optimizer steps (0 = none; the final state/ is always saved)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Newest checkpoints kept."})
    device: str = field(default="auto", metadata={
        "help": "Device (several processes: each gets its own GPU from the launcher).", "choices": DEVICES})
    dtype: str = field(default="auto", metadata={
        "help": "Base model dtype: auto = bf16 on capable GPUs, else fp32; float16 "
                "needs --mixed-precision fp16 (CUDA).", "choices": DTYPES})
    retain_cpu_memory: bool = field(default=True, metadata={
        "help": "CPU runs on Linux: keep freed memory in the process "
                "heap for the next step instead of returning it to the OS (glibc mallopt), which saves "
                "re-faulting every step's activations; the resident size stays at its peak."})
    mixed_precision: str | None = field(default=None, metadata={
        "help": "Accelerate mixed precision; None = the launcher's (accelerate launch's mixed_precision) or no, and a "
                "value contradicting the launcher's is refused (the resolved value goes to config.yaml); fp16 is CUDA "
                "only (loss scaling by Accelerate, trainable tensors stay float32).", "choices": MIXED_PRECISION})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute each decoder layer in the backward pass "
                "instead of keeping its activations (non-reentrant): less memory, one more forward."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the frozen base in 4 bits (bitsandbytes nf4, "
                "double quantization, compute dtype from --dtype)."})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "Load the frozen base in 8 bits (bitsandbytes LLM.int8)."})
    report_to: list[str] | None = field(default=None, metadata={
        "help": "Experiment trackers of Accelerate (tensorboard, "
                "wandb, mlflow, ...) that get every loss part, eta and the lowest-loss component "
                "per step, besides metrics.jsonl; their logs go to RUN_DIR/trackers."})
    window: int = field(default=50, metadata={"help": "Steps per bar of the lowest-loss-share plot (Figure 3)."})

    def __post_init__(self) -> None:
        for name in ("tasks", "target_modules", "report_to"):  # a YAML scalar means a one-item list
            if isinstance(getattr(self, name), str):
                setattr(self, name, [x for x in getattr(self, name).split(",") if x])
        self.validate(self.integer_checks(["num_components", "r", "cutoff_len", "batch_size", "grad_accum", "epochs",
                                           "window", "keep_checkpoints", "val_size", "max_nonfinite_steps"], 1)
                      + self.integer_checks(["max_steps", "save_every", "warmup_steps", "train_per_task", "eval_size",
                                             "seed", "train_size"], 0)
                      + [(self.max_grad_norm >= 0,
                          f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}"),
                         (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")])
        for f in fields(self):         # every field with a fixed set of values (or None where that is the default)
            value = getattr(self, f.name)
            if "choices" in f.metadata and value not in f.metadata["choices"] and (value, f.default) != (None, None):
                raise ValueError(f"TrainConfig: {f.name} must be one of {', '.join(f.metadata['choices'])}, "
                                 f"got {getattr(self, f.name)!r}")
        if self.data_seed is not None and (not isinstance(self.data_seed, int) or isinstance(self.data_seed, bool)
                                           or self.data_seed < 0):
            raise ValueError(f"TrainConfig: data_seed must be None (= seed) or an integer >= 0, got {self.data_seed!r}")
        if self.dtype in ("float16", "fp16") and self.mixed_precision not in ("fp16", None):   # None: checked resolved
            raise ValueError("TrainConfig: float16 training needs loss scaling: add --mixed-precision fp16 (CUDA), "
                             "or use bfloat16 or float32")
        if self.answer_format != "label" and (self.data == "convai2" or self.data.split(":")[0] == "mmlu"):
            raise ValueError(f"TrainConfig: answer_format {self.answer_format} applies to commonsense items with "
                             f"options (commonsense-mini or LLM-Adapters files), not to data {self.data!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("TrainConfig: choose one of load_in_4bit and load_in_8bit")
        if self.report_to is not None:
            from accelerate.utils import LoggerType

            trackers = [t.value for t in LoggerType]
            unknown = sorted(set(self.report_to) - set(trackers))
            if unknown:
                raise ValueError(f"TrainConfig: unknown tracker(s) {unknown} in report_to; "
                                 f"choose from {', '.join(trackers)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: lr must be > 0, got {self.lr!r}")
        if not isinstance(self.method_options, dict):
            raise ValueError(f"TrainConfig: method_options must be a mapping, got {self.method_options!r}")
        if self.train_size and self.data == "commonsense-mini":
            raise ValueError("TrainConfig: commonsense-mini draws train_per_task items per task; train_size is for "
                             "the other data sources")


    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """``ConfigDict.from_dict``; ComLoRA's options that an earlier TrainConfig held at its top level
        (``FORMER_TOP_LEVEL_OPTIONS``, in recorded runs and experiment files) go to ``method_options``, a value
        equal to the one it then had by default left out (the method's config has the same default)."""
        values = dict(values)
        options = dict(values.get("method_options") or {})
        for name, default in FORMER_TOP_LEVEL_OPTIONS.items():
            if name in values:
                value = values.pop(name)
                if value != default:
                    options.setdefault(name, value)
        if options:
            values["method_options"] = options
        return super().from_dict(values)

    @property
    def split_seed(self) -> int:
        """The seed of the data split: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    return values


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """``key=value`` pairs (value parsed as YAML); ``a.b=value`` sets a nested key such as method_options.align_sign."""
    values = dict(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        value = yaml.safe_load(raw)
        head, _, rest = key.partition(".")
        if rest:
            if not isinstance(values.get(head) or {}, dict):
                raise ValueError(f"--set {item}: {head} is not a mapping")
            values[head] = {**(values.get(head) or {}), rest: value}
        else:
            values[key] = value
    return values

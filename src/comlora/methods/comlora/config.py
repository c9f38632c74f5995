"""ComLoraConfig: every switch of the method (docs/method.md; our readings of the paper: docs/spec-notes.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from comlora.methods.adapter_config import AdapterConfig

ANNEAL_SCHEDULES = ("constant", "cosine", "exponential", "linear")
LOSS_REDUCTIONS = ("mean", "sum")
PAIRWISE_DIRECTIONS = ("intended", "literal")
COMPETITION_MODES = ("batched", "low_memory")
@dataclass
class ComLoraConfig(AdapterConfig):
    """Configuration of competitive LoRA: K components of rank r per adapted layer, a selector, three losses."""

    selects_winner: ClassVar[bool] = True

    num_components: int = field(default=2, metadata={"help": "K: LoRA components per adapted layer that compete."})
    top_n: int | None = field(default=None, metadata={
        "help": "N of the alignment loss: the N components with the highest selector similarity (1..K); None = K "
                "(the paper's best, Table 7)."})
    noise_alpha: float = field(default=0.1, metadata={
        "help": "Std of the Gaussian noise added to per-sample losses in the pairwise loss (Eq. 6)."})
    anneal: str = field(default="exponential", metadata={
        "help": f"Schedule eta(t) of the alignment loss: one of {ANNEAL_SCHEDULES}.", "choices": ANNEAL_SCHEDULES})
    anneal_rate: float = field(default=5.0, metadata={
        "help": "gamma of the exponential schedule eta(t) = 1 - exp(-gamma t / T)."})
    loss_reduction: str = field(default="mean", metadata={
        "help": "Per-sample loss l[b,k] over target tokens: 'mean' (default) or 'sum' (Eq. 4 literally)."})
    pairwise_direction: str = field(
        default="intended",
        metadata={"help": "'intended': P[i,j] = l_j - l_i (lower loss -> higher similarity); "
                          "'literal': Eq. 7 as printed, P[i,j] = l_i - l_j."},
    )
    pairwise_detach_lm: bool = field(default=True, metadata={
        "help": "Stop the pairwise loss's gradient into the components (review version); False = camera-ready form."})
    align_sign: int = field(default=1, metadata={
        "help": "+1: minimise the selector-weighted LM loss (review version); -1: the camera-ready's leading minus."})
    lm_loss: bool = field(default=True, metadata={"help": "Use L_LM (ablation switch)."})
    align_loss: bool = field(default=True, metadata={"help": "Use L_align (ablation switch; needs the selector)."})
    pairwise_loss: bool = field(default=True, metadata={
        "help": "Use L_pairwise (ablation switch; needs the selector)."})
    lm_weight: float = field(default=1.0, metadata={
        "help": "w_lm in L = w_lm L_LM + w_align L_align + w_pair L_pairwise."})
    align_weight: float = field(default=1.0, metadata={"help": "w_align in the total loss."})
    pairwise_weight: float = field(default=1.0, metadata={"help": "w_pair in the total loss."})
    use_selector: bool = field(default=True, metadata={
        "help": "False = the 'without selector' ablation: L_LM only, winner by "
                "validation loss. K=1 never has a selector (nothing to select)."})
    selector_dim: int | None = field(default=None, metadata={
        "help": "Width of the selector; None = the base model's hidden size (no input projection)."})
    selector_heads: int = field(default=8, metadata={
        "help": "Attention heads of the selector's Transformer encoder layer."})
    selector_ffn_dim: int = field(default=2048, metadata={
        "help": "Feed-forward width of the selector's Transformer encoder layer."})
    selector_dropout: float = field(default=0.1, metadata={
        "help": "Dropout inside the selector's Transformer encoder layer."})
    selector_init_std: float = field(default=0.02, metadata={
        "help": "Std of the normal init of the K component embeddings E."})
    competition: str = field(
        default="batched",
        metadata={"help": "'batched': all K components in one forward and backward (fastest); 'low_memory': the same "
                          "gradients with one component's activations alive at a time "
                          "(K+1 forwards, for memory-bound users)."})
    decide_at: float | None = field(default=None, metadata={
        "help": "Early decision: at this fraction of the training steps (0 < decide_at < 1) the winner is selected on "
                "the validation set and the rest of training runs the winner alone, on L_LM "
                "(None = compete to the end)."})

    def __post_init__(self) -> None:
        if self.top_n is None and isinstance(self.num_components, int):
            self.top_n = self.num_components
        checks = self.adapter_checks("num_components") + [
            (isinstance(self.top_n, int) and 1 <= self.top_n <= max(self.num_components, 1),
             f"top_n must be in 1..K={self.num_components}, got {self.top_n!r}"),
            (0.0 <= self.selector_dropout < 1.0, f"selector_dropout must be in [0, 1), got {self.selector_dropout!r}"),
            (self.noise_alpha >= 0, f"noise_alpha must be >= 0, got {self.noise_alpha!r}"),
            (self.anneal in ANNEAL_SCHEDULES,
             f"unknown annealing schedule {self.anneal!r}; choose one of {', '.join(ANNEAL_SCHEDULES)}"),
            (self.anneal_rate > 0, f"anneal_rate must be > 0, got {self.anneal_rate!r}"),
            (self.loss_reduction in LOSS_REDUCTIONS,
             f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}"),
            (self.pairwise_direction in PAIRWISE_DIRECTIONS,
             f"pairwise_direction must be one of {PAIRWISE_DIRECTIONS}, got {self.pairwise_direction!r}"),
            (self.competition in COMPETITION_MODES,
             f"competition must be one of {COMPETITION_MODES}, got {self.competition!r}"),
            (self.align_sign in (1, -1), f"align_sign must be 1 or -1, got {self.align_sign!r}"),
            (self.selector_dim is None or self.selector_dim >= 1,
             f"selector_dim must be None or >= 1, got {self.selector_dim!r}"),
            (self.selector_heads >= 1 and self.selector_ffn_dim >= 1,
             "selector_heads and selector_ffn_dim must be >= 1"),
            (min(self.lm_weight, self.align_weight, self.pairwise_weight) >= 0, "loss weights must be >= 0"),
            (self.use_selector or not (self.uses_align or self.uses_pairwise),
             "use_selector=False (the 'without selector' ablation) has no alignment or pairwise loss: "
             "also set align_loss=False and pairwise_loss=False"),
            (self.uses_lm or self.uses_align or self.uses_pairwise,
             "at least one of lm_loss, align_loss, pairwise_loss must be on with a weight > 0"),
            (self.num_components > 1 or self.uses_lm,
             "with K=1 the objective is L_LM alone (plain LoRA): lm_loss must be on with lm_weight > 0"),
            (self.decide_at is None or (isinstance(self.decide_at, (int, float))
                                        and not isinstance(self.decide_at, bool)
                                        and 0 < self.decide_at < 1),
             f"decide_at must be None or a fraction strictly between 0 and 1, got {self.decide_at!r}"),
        ]
        self.validate(checks)
        if self.selector_dim is not None and self.selector_dim % self.selector_heads:
            raise ValueError(f"ComLoraConfig: selector_dim={self.selector_dim} "
                             f"is not divisible by selector_heads={self.selector_heads}")


    def check_processes(self, num_processes: int) -> None:
        if self.competition == "low_memory" and num_processes > 1:
            raise ValueError("competition='low_memory' runs its own backward passes inside autograd, which DDP cannot "
                             "synchronise: use it with one process")

    # A loss term is in the objective when its switch is on AND its weight is > 0: a zero weight is the switch off.
    @property
    def uses_lm(self) -> bool:
        return self.lm_loss and self.lm_weight > 0

    @property
    def uses_align(self) -> bool:
        return self.align_loss and self.align_weight > 0

    @property
    def uses_pairwise(self) -> bool:
        return self.pairwise_loss and self.pairwise_weight > 0

    @property
    def has_selector(self) -> bool:
        """A selector exists unless ablated (use_selector=False) or pointless (K=1: nothing to select)."""
        return self.use_selector and self.num_components > 1

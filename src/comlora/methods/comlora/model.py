"""ComLoraModel: injection of the K components and the selector, the competition step, winner
selection (docs/method.md). Counting, save and load: ``methods/base.py``; export and merge of one component:
``export.py``."""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from comlora.data.items import IGNORE_INDEX
from comlora.methods.base import LayerAdapterModel, LoraWeight, WinnerReport
from comlora.methods.comlora.config import ComLoraConfig
from comlora.methods.comlora.export import merge_component, write_peft_adapter
from comlora.methods.comlora.layer import ComLoraLinear
from comlora.methods.comlora.losses import add_noise, alignment_loss, anneal_eta, pairwise_loss
from comlora.methods.comlora.selector import LoraSelector
from comlora.methods.losses import sequence_losses
from comlora.storage import write_json


@dataclass
class CompetitionOutput:
    """What one competition step computed. ``per_sample_loss`` and ``sim`` are ``[B, K]``;
    rows where ``valid`` is False (no target token) are zero and were left out of every loss."""

    loss: torch.Tensor
    parts: dict[str, float]
    per_sample_loss: torch.Tensor
    sim: torch.Tensor | None
    valid: torch.Tensor
    num_target_tokens: int


class ComLoraModel(LayerAdapterModel):
    """A frozen causal LM with K competing LoRA components per target module and a LoRA selector."""

    config_class = ComLoraConfig
    state_name = "comlora"
    mergeable = True        # the winner merges into the base weights: zero inference overhead
    labels = ("LoRA", "selector")
    progress_keys = ("lm", "align", "pairwise", "eta")

    def __init__(self, model: nn.Module, config: ComLoraConfig) -> None:
        super().__init__(model, config)
        self.winner: int | None = None
        self.decided: int | None = None          # early decision: the one component still trained
        self.decided_at_step: int | None = None

    def make_layer(self, layer: nn.Module) -> ComLoraLinear:
        cfg = self.config
        return ComLoraLinear(layer, cfg.num_components, cfg.r, cfg.lora_alpha, cfg.lora_dropout)

    def add_modules(self) -> None:
        """The selector on the input embeddings' device (none without one: use_selector=False or K=1)."""
        cfg = self.config
        embed = self.model.get_input_embeddings()
        self.selector = None
        if cfg.has_selector:
            self.selector = LoraSelector(embed.embedding_dim, cfg.num_components, cfg.selector_dim, cfg.selector_heads,
                                         cfg.selector_ffn_dim, cfg.selector_dropout, cfg.selector_init_std)
            self.selector.to(embed.weight.device)

    @property
    def adapted(self) -> dict[str, ComLoraLinear]:
        """{module name inside ``.model``: its ComLoraLinear}."""
        return self.injected

    # ---- modes -------------------------------------------------------------------------
    def _set_mode(self, competition: bool, component: int | None) -> tuple[bool, int | None]:
        if not self.adapted:
            raise RuntimeError("this ComLoraModel was merged in place (merge(k, inplace=True)): its components are "
                               "gone; use the merged model it returned, or ComLoraModel.load a saved state")
        previous = next(iter(self.adapted.values()))
        before = (previous.competition, previous.active_component)
        for layer in self.adapted.values():
            layer.competition, layer.active_component = competition, component
        return before

    @contextmanager
    def _mode(self, competition: bool, component: int | None):
        before = self._set_mode(competition, component)
        try:
            yield self
        finally:
            self._set_mode(*before)

    def recompute_contexts(self):
        """(forward, recomputation) contexts for activation checkpointing: a checkpointed layer is recomputed in the
        backward pass in the mode it ran in (competition or one component), whatever the mode is by then."""
        layer = next(iter(self.adapted.values()))
        return nullcontext(), self._mode(layer.competition, layer.active_component)

    def use_component(self, component: int):
        """Context: every forward / generate uses base + component ``component`` alone."""
        self._check_component(component)
        return self._mode(False, component)

    def disable_adapters(self):
        """Context: the frozen base model alone."""
        return self._mode(False, None)

    def _check_component(self, component: int) -> None:
        if component is None:
            raise ValueError(f"component must be an integer in 0..{self.config.num_components - 1}, got None")
        self.resolve_component(component)

    def _require_mode(self) -> None:
        layer = next(iter(self.adapted.values()))
        if layer.competition or layer.active_component is not None:
            return
        if self.config.num_components == 1:
            self._set_mode(False, 0)
            return
        raise RuntimeError(f"this ComLoraModel has K={self.config.num_components} components: choose one with "
                           "`with model.use_component(k):`, or use `with model.disable_adapters():` for the base model")

    def forward(self, *args, **kwargs):
        self._require_mode()
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self._require_mode()
        return self.model.generate(*args, **kwargs)

    # ---- the competition ---------------------------------------------------------------
    def component_losses(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched forward of all K components: returns ``l [B, K]`` and the target-token count ``[B]``.

        The batch is replicated K times, slice k through component k (``losses.sequence_losses``).
        """
        with self._mode(True, None):
            return sequence_losses(self.model, input_ids, attention_mask, labels, self.config.num_components,
                                   self.config.loss_reduction)

    def similarity(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """sim [B, K] from the selector on the frozen input embeddings (Eq. 1-3)."""
        if self.selector is None:
            raise RuntimeError("this ComLoraModel was built with use_selector=False: it has no selector")
        with torch.no_grad():
            embeddings = self.model.get_input_embeddings()(input_ids)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):   # rankings need float32
            return self.selector(embeddings.float(), attention_mask)

    def competition_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                         step: int, total_steps: int, generator: torch.Generator | None = None) -> CompetitionOutput:
        """L = w_lm L_LM + w_align L_align + w_pair L_pairwise for one batch (Eq. 4-10)."""
        cfg = self.config
        if self.decided is not None:
            return self.decided_step(input_ids, attention_mask, labels, step, total_steps)
        if cfg.competition == "low_memory":
            anchor = next(iter(self.adapted.values())).lora_A
            losses, counts = LowMemoryComponentLosses.apply(self, input_ids, attention_mask, labels, anchor)
        else:
            losses, counts = self.component_losses(input_ids, attention_mask, labels)
        return self.competition_objective(losses, counts, input_ids, attention_mask, step, total_steps, generator)

    def decided_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     step: int, total_steps: int) -> CompetitionOutput:
        """After an early decision: L = L_LM of the decided component alone (a batch of B rows, not K*B)."""
        with self.use_component(self.decided):
            losses, counts = sequence_losses(self.model, input_ids, attention_mask, labels, 1,
                                             self.config.loss_reduction)
        valid = self._valid_samples(counts)
        lm = losses[valid, 0].mean()
        eta = anneal_eta(self.config.anneal, step, total_steps, self.config.anneal_rate)
        return CompetitionOutput(loss=lm, parts={"lm": float(lm.detach()), "eta": eta, "loss": float(lm.detach())},
                                 per_sample_loss=(losses * valid.unsqueeze(1)).detach(), sim=None, valid=valid,
                                 num_target_tokens=int(counts.sum()))

    @staticmethod
    def _valid_samples(counts: torch.Tensor) -> torch.Tensor:
        valid = counts > 0
        if not bool(valid.any()):
            raise ValueError("the batch has no target token at all (every label is -100): check the label masking "
                             "and cutoff_len; prompts longer than cutoff_len leave no response token")
        return valid

    def competition_objective(self, losses: torch.Tensor, counts: torch.Tensor, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor, step: int, total_steps: int,
                              generator: torch.Generator | None = None) -> CompetitionOutput:
        """The losses of Eq. 4-10 given the per-sample, per-component losses ``l [B, K]`` and target counts ``[B]``
        (however they were computed); samples with no target token are left out."""
        cfg = self.config
        valid = self._valid_samples(counts)
        l = losses[valid]
        eta = anneal_eta(cfg.anneal, step, total_steps, cfg.anneal_rate)
        lm = l.mean()
        # a term is in the objective when its switch is on and its weight > 0 (a zero weight is the switch off);
        # K = 1 has no selector, so its objective is L_LM alone: plain LoRA's
        total = cfg.lm_weight * lm if cfg.uses_lm else lm.new_zeros(())
        parts = {"lm": float(lm.detach()), "eta": eta}
        sim = None
        if self.selector is not None:
            sim_all = self.similarity(input_ids, attention_mask)
            sim = sim_all[valid]
            align = alignment_loss(sim, l, cfg.top_n, eta, cfg.align_sign)
            noisy = add_noise(l.detach() if cfg.pairwise_detach_lm else l, cfg.noise_alpha, generator)
            pair = pairwise_loss(sim, noisy, cfg.pairwise_direction)
            if cfg.uses_align:
                total = total + cfg.align_weight * align
            if cfg.uses_pairwise:
                total = total + cfg.pairwise_weight * pair
            parts.update(align=float(align.detach()), pairwise=float(pair.detach()))
            sim = sim_all.detach() * valid.unsqueeze(1)
        parts["loss"] = float(total.detach())
        return CompetitionOutput(loss=total, parts=parts, per_sample_loss=(losses * valid.unsqueeze(1)).detach(),
                                 sim=sim, valid=valid, num_target_tokens=int(counts.sum()))

    def training_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      step: int, total_steps: int) -> tuple[torch.Tensor, dict]:
        """The trainer's interface: the total loss and its parts, plus each component's mean loss on the batch."""
        out = self.competition_step(input_ids, attention_mask, labels, step, total_steps)
        if self.decided is not None:
            return out.loss, dict(out.parts, target_tokens=out.num_target_tokens)
        parts = dict(out.parts, component_loss=out.per_sample_loss[out.valid].mean(0).tolist(),
                     target_tokens=out.num_target_tokens)
        return out.loss, parts

    def training_state(self) -> dict:
        """What a saved state or checkpoint carries besides tensors: the winner and the early decision, if made."""
        return {"winner": self.winner, "decided": self.decided, "decided_at_step": self.decided_at_step}

    def load_training_state(self, state: dict) -> None:
        winner, decided, at_step = state.get("winner"), state.get("decided"), state.get("decided_at_step")
        k = self.config.num_components
        if winner is not None and (not isinstance(winner, int) or isinstance(winner, bool) or not 0 <= winner < k):
            raise ValueError(f"saved training state: winner must be null or a component 0..{k - 1}, got {winner!r}")
        if decided is not None and (not isinstance(decided, int) or isinstance(decided, bool) or not 0 <= decided < k):
            raise ValueError(f"saved training state: decided must be null or a component 0..{k - 1}, got {decided!r}")
        if (decided is None) != (at_step is None) or (at_step is not None
                                                       and (not isinstance(at_step, int) or at_step < 1)):
            raise ValueError(f"saved training state: decided_at_step must be a step >= 1 exactly when decided is set, "
                             f"got decided={decided!r}, decided_at_step={at_step!r}")
        self.winner, self.decided, self.decided_at_step = winner, decided, at_step

    # ---- winner ------------------------------------------------------------------------
    def validation_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          labels: torch.Tensor | None = None):
        """One batch's pass for winner selection: ``(sim [B, K], l [B, K], target counts [B])``, the selector's
        similarities (None without a selector) and all K components' losses in one batched forward (None without
        labels)."""
        sim = self.similarity(input_ids, attention_mask) if self.selector is not None else None
        if labels is None:
            return sim, None, None
        losses, counts = self.component_losses(input_ids, attention_mask, labels)
        return sim, losses, counts

    @torch.no_grad()
    def select_winner(self, batches, compute_loss: bool = True, progress: bool = False) -> WinnerReport:
        """s_val[k] = sum over validation samples of sim[b, k]; winner = argmax_k s_val[k] (Eq. 11-12).

        ``batches`` yields dicts with input_ids, attention_mask and (for the loss) labels; right-padded rows are
        regrouped by length first (``regroup_by_length``: the same samples, less padding). One rule for every
        ablation: wherever a selector exists the winner is its pick (even untrained, as with pairwise_loss off:
        that is what the ablation measures), and the lowest-validation-loss pick is reported beside it; without
        a selector (use_selector=False, K=1) the winner is the lowest validation loss. After an early decision
        (decide_at) the winner is the decided component. ``progress`` shows a bar on stderr.
        """
        if self.selector is None and not compute_loss:
            raise ValueError("without a selector the winner is chosen by validation loss: compute_loss must be True")
        batches = regroup_by_length(list(batches))
        samples = sum(batch["input_ids"].shape[0] for batch in batches)
        if samples == 0:
            raise ValueError("select_winner got no validation batch")
        was_training = self.training
        self.eval()
        k = self.config.num_components
        sim_sum, loss_sum, loss_samples = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), 0
        try:
            with tqdm(total=samples, desc="winner selection", unit="item", disable=not progress, file=sys.stderr,
                      dynamic_ncols=True) as bar:
                for batch in batches:
                    sim, losses, counts = self.validation_scores(batch["input_ids"], batch["attention_mask"],
                                                                 batch["labels"] if compute_loss else None)
                    if sim is not None:
                        sim_sum += sim.double().sum(0).cpu()
                    if losses is not None:
                        loss_sum += losses[counts > 0].double().sum(0).cpu()
                        loss_samples += int((counts > 0).sum())
                    bar.update(batch["input_ids"].shape[0])
        finally:
            self.train(was_training)
        if compute_loss and loss_samples == 0:
            raise ValueError("no validation sample has a target token: cannot compute validation losses")
        by_sim = int(sim_sum.argmax()) if self.selector is not None else None
        val_loss = (loss_sum / loss_samples).tolist() if compute_loss else None
        by_loss = int(torch.tensor(val_loss).argmin()) if compute_loss else None
        winner = self.decided if self.decided is not None else by_sim if by_sim is not None else by_loss
        report = WinnerReport(winner=winner, winner_by_similarity=by_sim,
                              winner_by_loss=by_loss, similarity=sim_sum.tolist() if by_sim is not None else None,
                              val_loss=val_loss, num_samples=samples, decided_at_step=self.decided_at_step)
        self.winner = report.winner
        return report

    def early_decision_step(self, total_steps: int) -> int | None:
        """The optimizer step before which a run with ``decide_at`` fixes its winner: round(decide_at * T), at
        least 1 (None without an early decision)."""
        if self.config.decide_at is None:
            return None
        return max(1, round(self.config.decide_at * total_steps))

    def on_optimizer_step(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer,
                          validation_batches, record_dir: Path | None) -> None:
        """The early decision (``decide_at``): at its step, select the winner on the validation set; from here on
        only it trains (``decided_step``). Every process selects on the same weights and data, so all agree. The
        other components' Adam momentum is zeroed: their slices get zero gradients from now on, and without this
        their weights would keep drifting. The main process writes ``decision.json``."""
        if step != self.early_decision_step(total_steps) or self.decided is not None:
            return
        report = self.select_winner(validation_batches())
        self.decided, self.decided_at_step = report.winner, step
        report.decided_at_step = step
        self.train()
        others = [k for k in range(self.config.num_components) if k != report.winner]
        for layer in self.adapted.values():
            for p in (layer.lora_A, layer.lora_B):
                state = optimizer.state.get(p)
                if state and "exp_avg" in state:
                    state["exp_avg"][others] = 0
        if record_dir is not None:
            write_json(record_dir / "decision.json", report.to_dict())
            print(f"early decision at step {step}: component {report.winner} trains alone from here "
                  f"(similarity {report.similarity}, validation loss {report.val_loss})", file=sys.stderr)

    # ---- components, export / merge (comlora/export.py) -------------------------------------------
    def lora_weights(self, component: int | None = None) -> list[LoraWeight]:
        """Component ``component`` (default: the winner) of every adapted layer: A_k^T [r, d_in], B_k^T [d_out, r]."""
        k = self.resolve_component(component)
        return [LoraWeight(name, layer.base_layer.weight, layer.lora_A[k].T, layer.lora_B[k].T, layer.scaling)
                for name, layer in self.adapted.items()]

    @property
    def num_components(self) -> int:
        return self.config.num_components

    def export_adapter(self, path: str | Path, component: int | None = None) -> Path:
        """Write component ``component`` (default: the winner) as a standard PEFT LoRA adapter."""
        return write_peft_adapter(self, self.resolve_component(component), path)

    def merge(self, component: int | None = None, inplace: bool = False) -> nn.Module:
        """A plain transformers model with W = W0 + (alpha/r) (A_k B_k)^T; ``inplace`` reuses (and
        consumes) this model's base to save memory, otherwise a copy is merged and this model stays usable."""
        return merge_component(self, self.resolve_component(component), inplace)

    # ---- parameters ----------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """{"adapter": every component's lora_A / lora_B, "router": the selector}; the paper's L/S shares."""
        groups = super().parameter_groups()
        if self.selector is not None:
            groups["router"].update({f"selector.{n}": p for n, p in self.selector.named_parameters()})
        return groups


class LowMemoryComponentLosses(torch.autograd.Function):
    """``l [B, K]`` with only one component's activations alive at a time (``competition="low_memory"``).

    Forward: all K per-sample losses in one batched pass without a graph. Backward receives dL/dl
    (the losses' gradient from whatever objective used them) and runs each component k alone,
    forward and backward with that upstream gradient, accumulating into the LoRA parameters. The
    gradients equal the batched mode's when lora_dropout is 0 (the re-run draws new dropout masks).
    ``anchor`` is one LoRA parameter, passed only so that autograd calls this backward.
    """

    @staticmethod
    def forward(ctx, cm: ComLoraModel, input_ids, attention_mask, labels, anchor):
        ctx.cm = cm
        ctx.save_for_backward(input_ids, attention_mask, labels)
        with torch.no_grad():
            losses, counts = cm.component_losses(input_ids, attention_mask, labels)
        ctx.mark_non_differentiable(counts)
        return losses, counts

    @staticmethod
    def backward(ctx, grad_losses, _grad_counts):
        input_ids, attention_mask, labels = ctx.saved_tensors
        cm = ctx.cm
        with torch.enable_grad():
            for k in range(cm.config.num_components):
                if not bool(grad_losses[:, k].any()):
                    continue
                with cm.use_component(k):
                    loss_k, _ = sequence_losses(cm.model, input_ids, attention_mask, labels, 1,
                                                cm.config.loss_reduction)
                torch.autograd.backward(loss_k[:, 0], grad_losses[:, k])
        return None, None, None, None, None


def regroup_by_length(batches: list[dict]) -> list[dict]:
    """The rows of right-padded batches (input_ids, attention_mask, labels), longest first, in batches of at most as
    many positions (rows x length) as the largest batch given, each as long as its longest row: the same samples with
    less padding, and no more memory. Batches with a row that is not right-padded are returned as they are."""
    rows, pad_id = [], 0
    for batch in batches:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch.get("labels")
        lengths = mask.sum(1)
        if not bool((mask == (torch.arange(mask.shape[1], device=mask.device) < lengths.unsqueeze(1))).all()):
            return batches
        if not bool(mask.all()):
            pad_id = int(ids[mask == 0][0])
        rows += [(ids[i, :n], None if labels is None else labels[i, :n]) for i, n in enumerate(lengths.tolist())]
    if not rows:
        return batches
    budget = max(batch["input_ids"].numel() for batch in batches)
    rows.sort(key=lambda row: -len(row[0]))
    groups, start = [], 0
    while start < len(rows):
        length = len(rows[start][0])          # the group's longest row: the rows are sorted longest first
        end = start + max(1, min(len(rows) - start, budget // max(1, length)))
        groups.append(rows[start:end])
        start = end
    return [padded(group, pad_id) for group in groups]


def padded(rows: list[tuple[torch.Tensor, torch.Tensor | None]], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of (input_ids, labels) rows: padding has attention 0 and label -100."""
    length, first = len(rows[0][0]), rows[0][0]
    ids = torch.full((len(rows), length), pad_id, dtype=first.dtype, device=first.device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=first.device)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=first.dtype, device=first.device)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, :len(row_ids)], mask[i, :len(row_ids)] = row_ids, 1
        if row_labels is not None:
            labels[i, :len(row_ids)] = row_labels
    batch = {"input_ids": ids, "attention_mask": mask}
    return batch if rows[0][1] is None else batch | {"labels": labels}

"""ComLoRA inside ``transformers.Trainer``: ``ComLoraTrainer`` (and the mixin TRL's ``ComLoraSFTTrainer`` shares).

The Trainer trains a ``CompetitionObjective`` around the ComLoraModel, whose forward is
``ComLoraModel.training_loss`` (the competition step with ``step`` / ``total_steps`` from the trainer state), so
whatever the Trainer wraps it in (DDP, mixed precision, ...) sees one module and the maths stays in the model:

- the loss parts lm / align / pairwise / eta and each component's loss go through the Trainer's ``log`` (so
  ``report_to`` sees them), averaged over the steps since the last log;
- ``args.max_grad_norm`` clips as ``clip_grad`` says (``clipping.py``): ``"per_group"`` (the default) the components
  and the selector each on their own, ``"joint"`` all together as the Trainer does; the last step's norm of each
  group before clipping is logged beside ``grad_norm`` (``grad_norm_adapter``, ``grad_norm_router``);
- ``evaluate`` selects the winner on the evaluation set (Eq. 11-12) and reports each component's validation
  loss and accumulated similarity; ``eval_loss`` is the winner's validation loss;
- checkpoints hold the trainable state only (every component and the selector: ``comlora_model.safetensors``)
  and ``train(resume_from_checkpoint=...)`` restores it;
- ``eval_dataset`` is required (refused at construction without one): ``save_model(dir)`` selects the winner on it
  and writes it as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``), with ``winner.json``
  and the full ComLoRA state.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer

from comlora.data.items import IGNORE_INDEX
from comlora.methods.base import AdapterModel, WinnerReport
from comlora.storage import load_state_tensors, read_json_object, read_safetensors, write_json
from comlora.training.clipping import clip_with_accelerator, gradient_groups, refuse_unsupported_clipping
from comlora.training.config import CLIP_GRAD

MODEL_INPUTS = ("input_ids", "attention_mask", "labels")


class CompetitionObjective(nn.Module):
    """The module a Trainer trains: forward(input_ids, attention_mask, labels, step, total_steps) = the
    ComLoraModel's (loss, parts) of one competition step."""

    def __init__(self, comlora_model: AdapterModel) -> None:
        super().__init__()
        self.comlora_model = comlora_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, step: int = 0, total_steps: int = 1):
        if labels is None:
            raise ValueError("ComLoRA training needs labels (the token ids to predict, -100 where no loss is taken)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.comlora_model.training_loss(input_ids, attention_mask, labels, step, total_steps)

    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        self.comlora_model.activation_checkpointing_enable(*args, **kwargs)

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        self.comlora_model.gradient_checkpointing_enable(*args, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.comlora_model.activation_checkpointing_disable()

    gradient_checkpointing_disable = activation_checkpointing_disable


class PaddingCollator:
    """Right-pads ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0) and ``labels`` (-100) to the
    longest example; a missing attention mask is all ones, missing labels are the input ids where attended."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = []
        for i, e in enumerate(examples):
            if "input_ids" not in e:
                raise ValueError(f"example {i} has no input_ids (it has {sorted(e)}): tokenize the dataset first")
            ids = torch.as_tensor(e["input_ids"]).tolist()
            mask = torch.as_tensor(e["attention_mask"]).tolist() if "attention_mask" in e else [1] * len(ids)
            labels = (torch.as_tensor(e["labels"]).tolist() if "labels" in e
                      else [t if m else IGNORE_INDEX for t, m in zip(ids, mask)])
            if not len(ids) == len(mask) == len(labels):
                raise ValueError(f"example {i}: input_ids, attention_mask and labels differ in length "
                                 f"({len(ids)}, {len(mask)}, {len(labels)})")
            rows.append((ids, mask, labels))
        length = max(len(ids) for ids, _, _ in rows)
        pad = lambda values, fill: values + [fill] * (length - len(values))  # noqa: E731
        return {"input_ids": torch.tensor([pad(ids, self.pad_token_id) for ids, _, _ in rows]),
                "attention_mask": torch.tensor([pad(mask, 0) for _, mask, _ in rows]),
                "labels": torch.tensor([pad(labels, IGNORE_INDEX) for _, _, labels in rows])}


def pad_token_id_of(comlora_model: AdapterModel, processing_class=None) -> int:
    """The tokenizer's pad token, else the base model's, else its EOS token, else 0 (padding is masked anyway)."""
    config = getattr(comlora_model.model, "config", None)
    for value in (getattr(processing_class, "pad_token_id", None), getattr(config, "pad_token_id", None),
                  getattr(config, "eos_token_id", None)):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


class ComLoraTrainerMixin:
    """What ComLoraTrainer and ComLoraSFTTrainer share, over a Trainer whose ``self.model`` is a
    CompetitionObjective."""

    comlora_model: AdapterModel
    winner_report: WinnerReport | None = None

    def _start_comlora(self, comlora_model: AdapterModel, eval_dataset, clip_grad: str) -> None:
        if not (isinstance(comlora_model, AdapterModel) and comlora_model.config.selects_winner):
            raise TypeError(f"{type(self).__name__} trains a ComLoraModel (ComLoraModel(base, ComLoraConfig(...))) "
                            f"or another method whose components compete, got {type(comlora_model).__name__}")
        if eval_dataset is None:      # refused now, not after training, when save_model has nothing to select on
            raise ValueError(f"{type(self).__name__} needs an eval_dataset: ComLoRA selects its winner on it "
                             "(evaluate(), save_model()); hold out part of your data for it, e.g. with "
                             "dataset.train_test_split(test_size=...)")
        if clip_grad not in CLIP_GRAD:
            raise ValueError(f"{type(self).__name__}: clip_grad must be one of {', '.join(CLIP_GRAD)}, "
                             f"got {clip_grad!r}")
        self.comlora_model = comlora_model
        self.clip_grad = clip_grad
        self._comlora_parts: dict[str, list] = defaultdict(list)
        self._group_grad_norms: dict[str, float] = {}

    # ---- training ------------------------------------------------------------------------
    def _clip_grad_norm(self, model):
        """The Trainer's clipping hook: ``args.max_grad_norm`` applied as ``clip_grad`` says; returns the norm of the
        whole gradient before clipping, and keeps each group's for the next log."""
        params = [p for p in model.parameters() if p.requires_grad]
        norms = clip_with_accelerator(self.accelerator, params, gradient_groups(self.comlora_model, params),
                                      self.args.max_grad_norm, self.clip_grad)
        self._group_grad_norms = {k: v for k, v in norms.items() if k != "grad_norm"}
        return norms["grad_norm"]

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The competition loss of ``ComLoraModel.competition_step`` (through the wrapped objective)."""
        missing = [k for k in ("input_ids", "labels") if k not in inputs]
        if missing:
            raise ValueError(f"a ComLoRA batch needs {missing} (it has {sorted(inputs)}); a dataset of input_ids / "
                             "attention_mask / labels is what ComLoraTrainer trains on")
        loss, parts = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                            labels=inputs["labels"], step=self.state.global_step,
                            total_steps=max(self.state.max_steps, 1))
        if model.training:
            for key, value in self.comlora_model.progress_metrics(parts).items():
                self._comlora_parts[key].append(value)
            self._comlora_parts["component_loss"].append(parts["component_loss"])
        return (loss, parts) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """The competition loss of a batch (no logits: ``evaluate`` reports the per-component losses)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """A training log gets the mean of lm / align / pairwise / eta, each component's loss and the lowest-loss
        component over the steps since the last log, and the last step's gradient norm of each group."""
        parts = self._comlora_parts
        if "loss" in logs:
            logs.update(self._group_grad_norms)
            self._group_grad_norms = {}
        if "loss" in logs and parts.get("component_loss"):
            for key in self.comlora_model.progress_keys:
                if parts.get(key):
                    logs[key] = sum(parts[key]) / len(parts[key])
            component_loss = torch.tensor(parts["component_loss"]).mean(0)
            logs.update({f"component_loss_{k}": float(v) for k, v in enumerate(component_loss)})
            logs["lowest_loss_component"] = int(component_loss.argmin())
            parts.clear()
        super().log(logs, *args, **kwargs)

    # ---- evaluation and winner selection -------------------------------------------------
    def _prepare_eval_dataset(self, dataset):
        return dataset

    def _eval_batches(self, dataset):
        """Batches of ``dataset`` (the data collator, unused columns removed) on this process's device.
        Every process evaluates the whole set, so every process selects the same winner."""
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset, collator = self._remove_unused_columns(dataset, description="evaluation"), self.data_collator
        else:
            collator = self._get_collator_with_removed_columns(self.data_collator, description="evaluation")
        loader = DataLoader(dataset, batch_size=self.args.eval_batch_size, collate_fn=collator)
        device = next(self.comlora_model.parameters()).device
        for batch in loader:
            if "attention_mask" not in batch:
                batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            yield {k: batch[k].to(device) for k in MODEL_INPUTS}

    def select_winner(self, eval_dataset=None) -> WinnerReport:
        """``ComLoraModel.select_winner`` on ``eval_dataset`` (default: the trainer's)."""
        dataset = self._prepare_eval_dataset(eval_dataset if eval_dataset is not None else self.eval_dataset)
        if dataset is None:
            raise ValueError("ComLoRA selects its winner on an evaluation set: give the trainer an eval_dataset")
        if isinstance(dataset, (str, dict)):
            raise ValueError("winner selection takes one evaluation dataset, not a name or a dict of them")
        self.winner_report = self.comlora_model.select_winner(self._eval_batches(dataset))
        return self.winner_report

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Winner selection on the evaluation set: ``<prefix>_loss`` (the winner's validation loss), each component's
        ``<prefix>_loss_component_k`` and ``<prefix>_similarity_k`` (accumulated over the set), ``<prefix>_winner``."""
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(datasets, dict):
            metrics = {}
            for name, dataset in datasets.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        report = self.select_winner(datasets)
        p = metric_key_prefix
        metrics = {f"{p}_loss": report.val_loss[report.winner], f"{p}_winner": report.winner,
                   f"{p}_samples": report.num_samples}
        metrics.update({f"{p}_loss_component_{k}": v for k, v in enumerate(report.val_loss)})
        if report.similarity is not None:
            metrics.update({f"{p}_similarity_{k}": v for k, v in enumerate(report.similarity)})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- saving and resuming -------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A checkpoint (``_internal_call``): the trainable state. Otherwise the winner, selected on ``eval_dataset``,
        as a PEFT adapter, plus ``winner.json`` and the full state (``comlora_config.json`` +
        ``comlora_model.safetensors``)."""
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if _internal_call:
            self._save(str(output_dir))
            return
        report = self.select_winner()
        if self.args.should_save:
            self.comlora_model.save(output_dir)
            self.comlora_model.export_adapter(output_dir, report.winner)
            write_json(output_dir / "winner.json", report.to_dict())
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Every component and the selector (safetensors) and the ComLoraConfig; never the frozen base."""
        if self.args.should_save:
            self.comlora_model.save(Path(output_dir if output_dir is not None else self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = Path(resume_from_checkpoint)
        config_file, weights_file = self.comlora_model.state_files(path)
        if not weights_file.is_file() or not config_file.is_file():
            raise ValueError(f"{path} is not a ComLoRA trainer checkpoint: "
                             f"{weights_file.name} / {config_file.name} missing")
        key = f"{self.comlora_model.state_name}_config"
        saved = read_json_object(config_file, key)[key]
        ours = self.comlora_model.config.to_dict()
        differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        if differ:
            raise ValueError(f"checkpoint {path} was written with another ComLoraConfig (differs in {differ})")
        load_state_tensors(self.comlora_model.state_tensors(), read_safetensors(weights_file), source=str(path))

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class ComLoraTrainer(ComLoraTrainerMixin, Trainer):
    """``transformers.Trainer`` for a ComLoraModel on a dataset of input_ids / attention_mask / labels
    (default collator: right padding, labels -100 on padding). ``clip_grad``: how ``args.max_grad_norm`` clips,
    ``"per_group"`` or ``"joint"`` (``clipping.py``). Every other Trainer argument works as usual."""

    def __init__(self, model: AdapterModel, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, clip_grad: str = "per_group", **kwargs) -> None:
        self._start_comlora(model, eval_dataset, clip_grad)
        if data_collator is None:
            data_collator = PaddingCollator(pad_token_id_of(model, processing_class))
        super().__init__(model=CompetitionObjective(model), args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         **kwargs)
        refuse_unsupported_clipping(self.accelerator, clip_grad)

"""ComLoRA inside TRL: ``ComLoraSFTTrainer``, an ``SFTTrainer`` whose loss is the competition step.

TRL prepares the data as it does for any model (chat templates, prompt-completion, assistant-only or
completion-only labels) and collates it; the training step, logging, evaluation, checkpoints and
``save_model`` are ComLoRA's (``hf_trainer.ComLoraTrainerMixin``). Needs ``trl`` (``pip install 'comlora[trl]'``).
"""

from __future__ import annotations

from transformers import Trainer

from comlora.methods.base import AdapterModel
from comlora.training.clipping import refuse_unsupported_clipping
from comlora.training.hf_trainer import ComLoraTrainerMixin, CompetitionObjective

try:
    from trl import SFTTrainer
except ImportError as err:       # the optional extra
    raise ImportError("ComLoraSFTTrainer needs TRL: pip install 'comlora[trl]'") from err


class ComLoraSFTTrainer(ComLoraTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` for a ComLoraModel: SFTTrainer's data preparation and collator, ComLoRA's competition loss.
    Packing and padding-free batches are refused (the competition needs one attention mask per sample).
    ``clip_grad``: how ``args.max_grad_norm`` clips, ``"per_group"`` or ``"joint"`` (``clipping.py``)."""

    def __init__(self, model: AdapterModel, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, clip_grad: str = "per_group", **kwargs) -> None:
        self._start_comlora(model, eval_dataset, clip_grad)
        if args is not None and (getattr(args, "packing", False) or getattr(args, "padding_free", False)):
            raise ValueError("ComLoraSFTTrainer does not support packing or padding_free: the competition runs each "
                             "sample under its own attention mask; set packing=False and padding_free=False")
        if kwargs.get("peft_config") is not None:
            raise ValueError("ComLoraSFTTrainer trains the ComLoRA components of its model: do not pass a peft_config")
        # SFTTrainer sets itself up around the causal LM (with the components injected), then trains the objective
        super().__init__(model=model.model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        self.model = self.model_wrapped = CompetitionObjective(model)
        self.callback_handler.model = self.model
        self.model_accepts_loss_kwargs = False          # the competition loss is a per-batch mean
        if self.place_model_on_device:
            self._move_model_to_device(self.model, self.args.device)
        refuse_unsupported_clipping(self.accelerator, clip_grad)

    def _prepare_eval_dataset(self, dataset):
        """A dataset given to ``evaluate`` / ``save_model`` is prepared (tokenised, labelled) as SFTTrainer does."""
        if self._skip_prepare_dataset or dataset is None or dataset is self.eval_dataset or isinstance(dataset, str):
            return dataset
        return self._prepare_dataset(dataset, self.processing_class, self.args, False, self._formatting_func, "eval")

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint (no SFTTrainer model card: the objective is not a transformers model)."""
        Trainer._save_checkpoint(self, model, trial)

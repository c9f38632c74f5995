"""comlora: competitive LoRA (ComLoRA, ICLR 2025) for Hugging Face causal language models."""

from comlora.methods.comlora.config import ComLoraConfig
from comlora.methods.comlora.model import CompetitionOutput, ComLoraModel, WinnerReport, get_comlora_model

__all__ = ["ComLoraConfig", "ComLoraModel", "ComLoraSFTTrainer", "ComLoraTrainer", "CompetitionOutput", "WinnerReport",
           "get_comlora_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The Trainer integrations load transformers.Trainer (and TRL) only when asked for."""
    if name == "ComLoraTrainer":
        from comlora.training.hf_trainer import ComLoraTrainer

        return ComLoraTrainer
    if name == "ComLoraSFTTrainer":
        from comlora.training.trl_trainer import ComLoraSFTTrainer

        return ComLoraSFTTrainer
    raise AttributeError(f"module 'comlora' has no attribute {name!r}")

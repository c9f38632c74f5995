"""comlora: competitive LoRA (ComLoRA, ICLR 2025) for Hugging Face causal language models."""

from .config import ComLoraConfig
from .model import CompetitionOutput, ComLoraModel, WinnerReport, get_comlora_model

__all__ = ["ComLoraConfig", "ComLoraModel", "CompetitionOutput", "WinnerReport", "get_comlora_model"]
__version__ = "0.1.0"

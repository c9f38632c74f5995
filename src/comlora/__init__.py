"""comlora: competitive LoRA (ComLoRA, ICLR 2025) for Hugging Face causal language models.

Each public name is imported from its module when first used (PEP 562): ``import comlora`` and the command line's
``--help`` load no torch, transformers or peft."""

import pkgutil

PUBLIC = {"ComLoraConfig": "comlora.methods.comlora.config:ComLoraConfig",
          "ComLoraModel": "comlora.methods.comlora.model:ComLoraModel",
          "CompetitionOutput": "comlora.methods.comlora.model:CompetitionOutput",
          "WinnerReport": "comlora.methods.base:WinnerReport",
          "ComLoraTrainer": "comlora.training.hf_trainer:ComLoraTrainer",
          "ComLoraSFTTrainer": "comlora.training.trl_trainer:ComLoraSFTTrainer"}
__all__ = sorted(PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in PUBLIC:
        raise AttributeError(f"module 'comlora' has no attribute {name!r}")
    value = globals()[name] = pkgutil.resolve_name(PUBLIC[name])
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *PUBLIC})

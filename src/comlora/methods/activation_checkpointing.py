"""Activation (gradient) checkpointing for every method model, delegated to the base transformers model.

Each decoder layer's activations are dropped after the forward pass and recomputed in the backward pass
(``torch.utils.checkpoint``, non-reentrant), which trades one more forward of every layer for the memory
of all but the layer inputs. Non-reentrant checkpointing needs no input that requires grad, so a frozen
base with trainable adapters inside its layers gets the same gradients as without it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def enable_activation_checkpointing(causal_lm: nn.Module, checkpoint_kwargs: dict | None = None,
                                    context_fn: Callable | None = None, every_n_layers: int = 1,
                                    offload: bool = False) -> None:
    """Turn on the base model's checkpointing with ``use_reentrant=False``; ``context_fn`` (torch.utils.checkpoint's:
    returns the (forward, recomputation) context managers) lets a method rerun a layer in the mode of its forward."""
    kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
    if kwargs["use_reentrant"]:
        raise ValueError("comlora supports non-reentrant activation checkpointing only (use_reentrant=False): the "
                         "reentrant form needs inputs that require grad and cannot restore a method's mode on "
                         "recomputation")
    if context_fn is not None:
        if "context_fn" in kwargs:
            raise ValueError("this method sets its own checkpoint context_fn; do not pass one")
        kwargs["context_fn"] = context_fn
    if not getattr(causal_lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(causal_lm).__name__} does not support activation checkpointing")
    enable = getattr(causal_lm, "activation_checkpointing_enable", None)
    if enable is not None:                      # transformers >= 5.x
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload)
        return
    if every_n_layers != 1 or offload:
        raise ValueError("every_n_layers and offload need a transformers version with activation_checkpointing_enable")
    causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_activation_checkpointing(causal_lm: nn.Module) -> None:
    disable = getattr(causal_lm, "activation_checkpointing_disable", None) or causal_lm.gradient_checkpointing_disable
    disable()


class ActivationCheckpointing:
    """``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` (and ``_disable``) on a method model
    whose causal LM is ``self.model``, with the signatures transformers.Trainer calls. A method that changes how its
    layers compute between calls (ComLoRA's competition mode) defines ``recompute_contexts()``."""

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute each decoder layer in the backward pass instead of keeping its activations (non-reentrant)."""
        enable_activation_checkpointing(self.model, activation_checkpointing_kwargs,
                                        getattr(self, "recompute_contexts", None), every_n_layers, offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options) -> None:
        """The older name of ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def activation_checkpointing_disable(self) -> None:
        disable_activation_checkpointing(self.model)

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether the base model recomputes its layers (transformers 5's name; older ones call it
        is_gradient_checkpointing)."""
        name = ("is_activation_checkpointing" if hasattr(type(self.model), "is_activation_checkpointing")
                else "is_gradient_checkpointing")
        return bool(getattr(self.model, name, False))

    is_gradient_checkpointing = is_activation_checkpointing

"""What every method model builds on: AdapterModel (injection under a seed, parameter counts, save / load of the
trainable tensors, the LM-only training loss, and the hooks training, export and evaluation call: docs/extending.md)
and LayerAdapterModel, the constructor of the methods that replace each target layer by their own. Every method's
config builds on ``adapter_config.AdapterConfig``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from comlora.methods.activation_checkpointing import ActivationCheckpointing
from comlora.methods.injection import PAPER_TARGET_MODULES, inject_linear_layers, with_resolved_targets
from comlora.methods.losses import mean_lm_loss
from comlora.methods.saved_state import check_weights_fit, config_from_file
from comlora.quantization import use_exact_4bit_forward, weight_count
from comlora.storage import load_state_tensors, read_json_object, read_safetensors, write_json, write_safetensors


@contextmanager
def seeded(seed: int):
    """Draw from the global generator seeded with ``seed``, leaving the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass
class WinnerReport:
    """Winner selection on a validation set (ComLoRA: Eq. 11-12), plus each component's validation loss."""

    winner: int
    winner_by_similarity: int | None
    winner_by_loss: int | None
    similarity: list[float] | None
    val_loss: list[float] | None
    num_samples: int
    decided_at_step: int | None = None     # early decision (decide_at): the step at which the winner was fixed

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoraWeight:
    """One adapted linear layer as a LoRA pair (GGUF export, the llama.cpp backend): W = base + scale * B @ A."""

    module: str                 # transformers module name, e.g. model.layers.3.self_attn.q_proj
    base: torch.Tensor          # W0 [d_out, d_in]
    A: torch.Tensor             # [r, d_in]
    B: torch.Tensor             # [d_out, r]
    scale: float

    def delta(self) -> torch.Tensor:
        """scale * B @ A in float64, shaped like the base weight."""
        return self.scale * (self.B.detach().double() @ self.A.detach().double())


class AdapterModel(ActivationCheckpointing, nn.Module):
    """Base of every method model: ``.model`` is the causal LM with the method's modules injected.

    A subclass sets ``config_class``, ``state_name`` and ``mergeable``, injects its modules in ``__init__``
    (``inject``) and records each extra one in ``self.injected`` (name inside ``.model`` -> module). Tensors named
    ``lora_*`` count as the adapter, every other tensor the method adds (router, selector, interaction matrix,
    filter) as the router. The saved state is ``<state_name>_config.json`` + ``<state_name>_model.safetensors``.
    A 4-bit base keeps bitsandbytes' dequantize-and-multiply forward in inference too (``use_exact_4bit_forward``):
    evaluation and the merge compute the function that was trained.
    """

    config_class: type
    state_name: str
    mergeable: bool                      # True: ``merge`` gives a plain transformers model
    labels = ("adapter", "router")       # what print_trainable_parameters calls the two groups
    progress_keys: tuple[str, ...] = ("lm",)     # the training_loss parts the training progress bar shows
    winner: int | None = None            # the selected component (methods with components)

    def __init__(self, model: nn.Module, config) -> None:
        super().__init__()
        self.model = use_exact_4bit_forward(model)
        self.config = config
        self.injected: dict[str, nn.Module] = {}

    def inject(self, make_layer: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
        """Freeze ``.model`` and replace every target module by ``make_layer(layer)``; returns {name: new layer}."""
        layers = inject_linear_layers(self.model, self.config.target_modules, make_layer)
        self.injected.update(layers)
        return layers

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def training_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      step: int, total_steps: int) -> tuple[torch.Tensor, dict]:
        """L = L_LM, the mean token cross-entropy over the target tokens (methods with auxiliary losses override)."""
        lm, target_tokens = mean_lm_loss(self.model, input_ids, attention_mask, labels)
        return lm, {"lm": float(lm.detach()), "loss": float(lm.detach()), "target_tokens": target_tokens}

    # ---- parameters ----------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """{"adapter": the lora_* tensors, "router": the method's other tensors}, keyed by their name in ``.model``."""
        groups = {"adapter": {}, "router": {}}
        for prefix, module in self.injected.items():
            for name, p in module.named_parameters():
                if not name.startswith("base_layer."):
                    groups["adapter" if name.startswith("lora_") else "router"][f"{prefix}.{name}"] = p
        return groups

    def state_tensors(self) -> dict[str, torch.Tensor]:
        groups = self.parameter_groups()
        return {**groups["adapter"], **groups["router"]}

    def parameter_counts(self) -> dict[str, int]:
        """{"adapter": trainable LoRA / expert weights, "router": the method's other trainable tensors, "base": the
        frozen base model (without the adapter's tensors), a 4-bit base counted in weights, not in packed bytes}. A
        tensor the method adds but keeps frozen (TeamLoRA's M with ``interaction_matrix="frozen"``) is saved with the
        state and counted in none of them."""
        groups = self.parameter_groups()
        added = {id(p) for group in groups.values() for p in group.values()}
        counts = {key: sum(p.numel() for p in group.values() if p.requires_grad) for key, group in groups.items()}
        counts["base"] = sum(weight_count(p) for p in self.model.parameters() if id(p) not in added)
        return counts

    def print_trainable_parameters(self) -> None:
        """Adapter and router parameters as counts and % of the base model (the paper's Params % L/S column)."""
        c = self.parameter_counts()
        adapter, router = 100 * c["adapter"] / c["base"], 100 * c["router"] / c["base"]
        print(f"trainable params ({self.state_name}): {self.labels[0]} {c['adapter']:,} ({adapter:.4f}%) | "
              f"{self.labels[1]} {c['router']:,} ({router:.4f}%) | base (frozen) {c['base']:,} | "
              f"L/S = {adapter:.2f}/{router:.2f}")

    # ---- the hooks of training, export and evaluation (defaults: one adapter, no components) ----------------
    @property
    def num_components(self) -> int | None:
        """K, for a method whose components are separate adapters (evaluated and exported one at a time); None for
        one adapter (MoELoRA's and TeamLoRA's experts only work together)."""
        return None

    def component_indices(self, spec: str) -> list[int | None]:
        """The components ``comlora eval --components SPEC`` evaluates (``all``, ``winner`` or an index), each used
        through ``use_component``; ``[None]``, the method as a whole, for a method without components."""
        if self.num_components is None:
            return [None]
        if spec == "all":
            return list(range(self.num_components))
        return [self.resolve_component(None if spec == "winner" else int(spec))]

    def resolve_component(self, component: int | None) -> int | None:
        """The component an export or an evaluation means by ``component``, None meaning the winner; a method
        without components is its own only one (None) and refuses any index but 0."""
        k = self.num_components
        if k is None:
            if component not in (None, 0):
                raise ValueError(f"a {self.state_name} run has no components to choose from")
            return None
        if component is None:
            if self.winner is None:
                raise ValueError("no component given and no winner selected yet: call select_winner() first "
                                 "or pass component=k")
            component = self.winner
        if not isinstance(component, int) or isinstance(component, bool) or not 0 <= component < k:
            raise ValueError(f"component must be an integer in 0..{k - 1}, got {component!r}")
        return component

    def use_component(self, component: int | None):
        """Context: every forward / generate uses component ``component`` alone (a method without components:
        None, the method as it is). A method with components overrides it."""
        self.resolve_component(component)
        return nullcontext(self)

    def component_name(self, component: int | None) -> str:
        """What an export calls ``component`` (GGUF metadata): ``component k`` (``(winner)`` for the winner), or the
        method's state name without components."""
        k = self.resolve_component(component)
        return self.state_name if k is None else f"component {k}" + (" (winner)" if k == self.winner else "")

    def select_winner(self, batches: Iterable[dict], progress: bool = False) -> WinnerReport:
        """Select the winner among the components on validation ``batches`` (``comlora select``)."""
        raise ValueError(f"{self.state_name} has no components to select a winner from")

    def export_adapter(self, path: str | Path, component: int | None = None) -> Path:
        """Write ``component`` (default: the winner) as an adapter folder: by default the saved state (a PEFT
        adapter for PEFT's LoRA)."""
        self.resolve_component(component)
        return self.save(path)

    def merge(self, component: int | None = None, inplace: bool = False) -> nn.Module:
        """A plain transformers model with ``component`` (default: the winner) merged into the base weights;
        ``inplace`` may consume this model's base. Only for a ``mergeable`` method."""
        raise ValueError(f"{self.state_name} cannot be merged into the base weights: it runs its own modules")

    def lora_weights(self, component: int | None = None) -> list[LoraWeight]:
        """Every adapted layer of ``component`` (default: the winner) as one LoRA pair, for GGUF export and the
        llama.cpp backend; a method whose modules are no LoRA refuses."""
        raise ValueError(f"{type(self).__name__} keeps its own modules at inference: it has no GGUF LoRA form")

    def progress_metrics(self, record: dict) -> dict[str, float]:
        """The values of one step's metrics the training progress bar shows (``progress_keys``)."""
        return {key: record[key] for key in self.progress_keys if key in record}

    def on_optimizer_step(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer,
                          validation_batches: Callable[[], list[dict]], record_dir: Path | None) -> None:
        """Called by the training loop before each optimizer step (``step`` steps done) with the optimizer; the
        validation batches are built when ``validation_batches()`` is called; ``record_dir`` is the run directory on
        the main process (None on the others). Nothing by default."""

    def finish_run(self, into: Path, batches: list[dict], record: dict) -> None:
        """The end of a training run, written into ``into`` (moved into the run once complete): the result on the
        validation ``batches`` (``winner.json``, the winner selection, for a method that selects one, else
        ``validation.json``, the mean LM loss), the state (``state/``) and, for a mergeable method, ``adapter/``
        (the winner) with a model card naming the base weights (``record``)."""
        from comlora.provenance import write_model_card

        if self.config.selects_winner:
            write_json(into / "winner.json", self.select_winner(batches, progress=True).to_dict() | record)
        else:
            with torch.no_grad():
                # the LM part only (MoELoRA adds its balance term to the loss), comparable across methods
                losses = [self.training_loss(b["input_ids"], b["attention_mask"], b["labels"], 0, 1)[1]["lm"]
                          * len(b["input_ids"]) for b in batches]
            samples = sum(len(b["input_ids"]) for b in batches)
            write_json(into / "validation.json", {"val_loss": sum(losses) / max(1, samples), "num_samples": samples}
                       | record)
        self.save(into / "state")
        if self.mergeable:
            self.export_adapter(into / "adapter")
            write_model_card(into / "adapter", record)

    # ---- save / load ---------------------------------------------------------------------
    def training_state(self) -> dict:
        """What a saved state or checkpoint carries besides tensors and the config (ComLoRA: winner, decision)."""
        return {}

    def load_training_state(self, state: dict) -> None:
        """Restore what ``training_state`` returned (read from a saved state or a checkpoint's trainer_state.json)."""

    @classmethod
    def state_files(cls, path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        return path / f"{cls.state_name}_config.json", path / f"{cls.state_name}_model.safetensors"

    def save(self, path: str | Path) -> Path:
        """``<state_name>_config.json`` (the config, the base's name, ``training_state``) +
        ``<state_name>_model.safetensors`` (every added tensor)."""
        config_file, weights_file = self.state_files(path)
        write_safetensors(weights_file, self.state_tensors())
        write_json(config_file, {"method": self.state_name, f"{self.state_name}_config": self.config.to_dict(),
                                 "base_model_name_or_path": getattr(self.model, "name_or_path", None),
                                 **self.training_state()})
        return Path(path)

    @classmethod
    def load(cls, model: nn.Module, path: str | Path):
        """Rebuild a saved method model on ``model`` (the same base it was trained on); the tensors' shapes are checked
        against the config on the meta device before anything is allocated."""
        config_file, weights_file = cls.state_files(path)
        for f in (config_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"{path} is not a saved {cls.__name__}: {f.name} is missing")
        key = f"{cls.state_name}_config"
        meta = read_json_object(config_file)
        if key not in meta:
            raise ValueError(f"{config_file}: {key} missing (the file is corrupt or not what comlora wrote)")
        config = config_from_file(cls.config_class, meta[key], config_file)
        check_weights_fit(lambda m: cls(m, config), model, weights_file, config_file)
        method = cls(model, config)
        load_state_tensors(method.state_tensors(), read_safetensors(weights_file), source=str(path))
        try:
            method.load_training_state(meta)
        except ValueError as err:
            raise ValueError(f"{config_file}: {err}") from err
        return method


class LayerAdapterModel(AdapterModel):
    """An AdapterModel that replaces every target layer by the method's adapted layer (``make_layer``), under
    ``config.seed``: the layers in module order, then ``add_modules`` (ComLoRA's selector, LoRATRF's filters).
    ``target_modules=None`` is the first list of ``preferred_targets`` that fits the model, else (with
    ``use_peft_target_mapping``) PEFT's default for its type (``injection.default_target_modules``); the config
    keeps the resolved list, so a saved state records the layers that were adapted."""

    preferred_targets: tuple[list[str], ...] = PAPER_TARGET_MODULES
    use_peft_target_mapping = True

    def __init__(self, model: nn.Module, config) -> None:
        config = with_resolved_targets(model, config, self.preferred_targets, self.use_peft_target_mapping)
        super().__init__(model, config)
        with seeded(config.seed):
            self.inject(self.make_layer)
            self.add_modules()

    def make_layer(self, layer: nn.Module) -> nn.Module:
        """The adapted layer that replaces the target layer ``layer`` (built from ``self.config``)."""
        raise NotImplementedError(f"{type(self).__name__} must define make_layer")

    def add_modules(self) -> None:
        """The method's modules besides the adapted layers, drawn after them under the same seed (none here)."""

"""The method contract (docs/extending.md): a new method is one module plus one line in ``methods/registry.py``.

A method with two components that merges is planted (its module written into a temporary folder, its line added to
``METHODS``) and goes through ``comlora train``, ``select``, ``export`` (PEFT, merged, GGUF adapter and merged GGUF)
and ``eval`` without any other file knowing it.
"""

import json
import sys
import textwrap

import gguf
import pytest
import torch
from conftest import train_args
from peft import PeftModel
from test_gguf_export import write_tiny_base_gguf
from transformers import AutoModelForCausalLM

from comlora.cli import main
from comlora.methods.base import AdapterModel
from comlora.methods.registry import METHODS, Method

PLANTED = '''
"""Two LoRA adapters trained side by side on the LM loss; the one with the lower validation loss wins."""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from comlora.methods.adapter_config import AdapterConfig
from comlora.methods.base import AdapterModel, LoraWeight, WinnerReport, seeded
from comlora.methods.losses import mean_lm_loss
from comlora.peft_import import peft
from comlora.storage import write_json, write_safetensors


@dataclass
class TwinConfig(AdapterConfig):
    """K plain LoRA adapters per target module."""

    selects_winner: ClassVar[bool] = True
    num_components: int = field(default=2, metadata={"help": "K: adapters trained side by side."})

    def __post_init__(self) -> None:
        self.validate(self.adapter_checks("num_components"))


class TwinLinear(nn.Module):
    def __init__(self, base_layer, k, r, scaling):
        super().__init__()
        self.base_layer, self.scaling, self.active = base_layer, scaling, None
        d_out, d_in = base_layer.weight.shape
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.randn(k, r, d_in, device=device) / d_in ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(k, d_out, r, device=device))

    def forward(self, x):
        k = self.active
        return self.base_layer(x) + self.scaling * (x @ self.lora_A[k].T @ self.lora_B[k].T)


class TwinModel(AdapterModel):
    config_class = TwinConfig
    state_name = "twin"
    mergeable = True

    def __init__(self, model, config):
        super().__init__(model, config)
        self.winner = None
        with seeded(config.seed):
            self.inject(lambda layer: TwinLinear(layer, config.num_components, config.r, config.scaling))

    @property
    def num_components(self):
        return self.config.num_components

    @contextmanager
    def use_component(self, component):
        k = self.resolve_component(component)
        for layer in self.injected.values():
            layer.active = k
        try:
            yield self
        finally:
            for layer in self.injected.values():
                layer.active = None

    def training_loss(self, input_ids, attention_mask, labels, step, total_steps):
        losses = []
        for k in range(self.num_components):
            with self.use_component(k):
                losses.append(mean_lm_loss(self.model, input_ids, attention_mask, labels))
        loss = sum(l for l, _ in losses) / len(losses)
        return loss, {"lm": float(loss.detach()), "loss": float(loss.detach()), "target_tokens": losses[0][1],
                      "component_loss": [float(l.detach()) for l, _ in losses]}

    @torch.no_grad()
    def select_winner(self, batches, progress=False):
        batches = list(batches)
        samples = sum(len(b["input_ids"]) for b in batches)
        val_loss = []
        for k in range(self.num_components):
            with self.use_component(k):
                val_loss.append(sum(float(mean_lm_loss(self.model, b["input_ids"], b["attention_mask"], b["labels"])[0])
                                    * len(b["input_ids"]) for b in batches) / samples)
        self.winner = min(range(len(val_loss)), key=val_loss.__getitem__)
        return WinnerReport(self.winner, None, self.winner, None, val_loss, samples)

    def training_state(self):
        return {"winner": self.winner}

    def load_training_state(self, state):
        self.winner = state.get("winner")

    def lora_weights(self, component=None):
        k = self.resolve_component(component)
        return [LoraWeight(name, layer.base_layer.weight, layer.lora_A[k], layer.lora_B[k], layer.scaling)
                for name, layer in self.injected.items()]

    def export_adapter(self, path, component=None):
        weights = self.lora_weights(component)
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path / "adapter_model.safetensors",
                          {f"base_model.model.{w.module}.lora_{n}.weight": t.detach().contiguous()
                           for w in weights for n, t in (("A", w.A), ("B", w.B))})
        config = peft.LoraConfig(r=self.config.r, lora_alpha=self.config.lora_alpha,
                                 target_modules=sorted(self.injected), task_type="CAUSAL_LM").to_dict()
        write_json(path / "adapter_config.json", {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()})
        return path

    @torch.no_grad()
    def merge(self, component=None, inplace=False):
        assert inplace, "this planted method merges in place only"
        for w in self.lora_weights(component):
            parent, _, child = w.module.rpartition(".")
            base = self.model.get_submodule(w.module).base_layer
            base.weight += w.delta().to(base.weight.dtype)
            setattr(self.model.get_submodule(parent), child, base)
        return self.model
'''


@pytest.fixture
def planted_method(tmp_path, monkeypatch):
    """The planted module importable as ``planted_twin``, and its one registry line."""
    folder = tmp_path / "planted"
    folder.mkdir()
    (folder / "planted_twin.py").write_text(textwrap.dedent(PLANTED))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setitem(METHODS, "twin", Method("planted_twin:TwinConfig", "planted_twin:TwinModel",
                                                "Two LoRA adapters side by side", "num_components"))
    yield "twin"
    sys.modules.pop("planted_twin", None)


def test_a_planted_method_trains_selects_exports_and_evaluates(planted_method, tmp_path, tiny_model_dir,
                                                               commonsense_root, monkeypatch, capsys):
    run = tmp_path / "run"
    main(train_args(tiny_model_dir, commonsense_root, run, "--method", planted_method, "--target-modules",
                    "q_proj,v_proj", max_steps=3))
    winner = json.loads((run / "winner.json").read_text())
    assert len(winner["val_loss"]) == 2 and winner["base_model"] == {"name": str(tiny_model_dir)}
    assert (run / "state" / "twin_model.safetensors").is_file() and (run / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows[0]["component_loss"]) == 2 and "lowest_loss_component" in rows[0]

    main(["select", str(run), "--out", str(tmp_path / "again.json")])
    assert json.loads((tmp_path / "again.json").read_text())["winner"] == winner["winner"]

    main(["export", str(run), "--component", "1", "--out", str(tmp_path / "c1")])
    main(["export", str(run), "--component", "1", "--merge", "--out", str(tmp_path / "m1")])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "c1").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m1").eval()
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert (merged(ids).logits - peft_model(input_ids=ids).logits).abs().max() < 1e-4

    main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "w.gguf")])
    reader = gguf.GGUFReader(tmp_path / "w.gguf")
    assert reader.get_field("comlora.exported").contents() == f"component {winner['winner']} (winner)"
    assert reader.get_field("comlora.method").contents() == "twin"
    base_gguf = write_tiny_base_gguf(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "base.gguf")
    monkeypatch.setattr("comlora.export.gguf.base_gguf_file", lambda model: base_gguf)
    main(["export", str(run), "--format", "gguf", "--merge", "--outtype", "f32", "--out", str(tmp_path / "m.gguf")])
    assert len(gguf.GGUFReader(tmp_path / "m.gguf").tensors) == len(gguf.GGUFReader(base_gguf).tensors)

    capsys.readouterr()
    main(["eval", "--run", str(run), "--components", "all", "--data-root", str(commonsense_root), "--eval-size", "4",
          "--limit", "1", "--greedy", "--max-new-tokens", "2", "--tasks", "boolq", "--out", str(tmp_path / "ev")])
    files = sorted(p.name for p in (tmp_path / "ev").glob("commonsense-run-component*.json"))
    assert files == [f"commonsense-run-component{k}{'-winner' if k == winner['winner'] else ''}-limit1.json"
                     for k in range(2)]


@pytest.mark.parametrize("name", list(METHODS))
def test_mergeable_means_a_merge(name):
    """``mergeable`` promises ``merge``: a mergeable method implements it, the others keep the refusing default."""
    model_class = METHODS[name].model_class
    assert model_class.mergeable == (model_class.merge is not AdapterModel.merge)

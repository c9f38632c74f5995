"""LoRATRF: the task-aware filter and its clamp against float64 loops, its placement on every decoder
layer's output, the LoRA part against PEFT, bad configs. The behaviour it shares with MoELoRA and TeamLoRA
(pass-through, training, save/load, counts) is in test_related_methods.py."""

import copy
import math

import pytest
import torch
from conftest import logits, make_batch, make_tiny_llama, randomise_lora_B
from conftest import make_loratrf_config as make_config
from peft import LoraConfig, get_peft_model

from comlora.methods.loratrf import LoraTrfModel, TaskFilter

TARGETS = ["o_proj", "gate_proj", "up_proj", "down_proj"]


def reference_filter(f, h):
    """Explicit loops in float64: w = clamp(cos(h_n, t), 0, 1); out_n = h_n + (w h_n) T1 T2."""
    t, T1, T2 = f.task_vector.detach().double(), f.T1.detach().double(), f.T2.detach().double()
    d, rank = T1.shape
    out = torch.zeros(h.shape, dtype=torch.float64)
    for n in range(h.shape[0]):
        hn = h[n].double()
        cos = sum(hn[i] * t[i] for i in range(d)) / (math.sqrt(sum(hn[i] ** 2 for i in range(d)))
                                                     * math.sqrt(sum(t[i] ** 2 for i in range(d))))
        w = min(max(float(cos), 0.0), 1.0)
        for o in range(d):
            mid = [sum(w * hn[i] * T1[i, j] for i in range(d)) for j in range(rank)]
            out[n, o] = hn[o] + sum(mid[j] * T2[j, o] for j in range(rank))
    return out


def test_filter_matches_float64_loops_and_leaves_tokens_pointing_away_from_t_untouched():
    torch.manual_seed(0)
    f = TaskFilter(6, 2)
    with torch.no_grad():
        f.T2.copy_(torch.randn(2, 6))
    t = f.task_vector.detach()
    h = torch.randn(5, 6)
    h[0] = -t + 0.1 * torch.randn(6)      # cos < 0: weight clamped to 0
    h[1] = 2.5 * t                         # cos = 1: weight 1
    h[2] = t - 0.3 * t.norm() * torch.randn(6)
    cos = torch.nn.functional.cosine_similarity(h, t, dim=-1)
    assert cos[0] < 0 and cos[1] > 0.999 and cos[2] > 0
    with torch.no_grad():
        out = f(h)
    assert (out.double() - reference_filter(f, h)).abs().max() < 1e-5
    assert torch.equal(out[0], h[0])
    assert not torch.equal(out[1], h[1]) and not torch.equal(out[2], h[2])
    with torch.no_grad():       # any leading shape, tokens independent
        assert torch.allclose(f(h.reshape(1, 5, 6)), out.reshape(1, 5, 6))


def test_filter_acts_on_the_output_of_every_decoder_layer():
    batch = make_batch()
    tm = LoraTrfModel(make_tiny_llama(), make_config())
    randomise_lora_B(tm.injected.values())
    decoder_layers = tm.model.model.layers
    assert sorted(n for n in tm.injected if n.endswith("task_filter")) == \
        ["model.layers.0.task_filter", "model.layers.1.task_filter"]
    seen = {}
    hooks = []
    for i, layer in enumerate(decoder_layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(("in", i), (a, kw)),
                                                     with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("out", i), out)))
    with torch.no_grad():        # no KV cache: re-running a layer below must not append to it
        tm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers):
            args, kwargs = seen[("in", i)]
            raw = layer.forward(*args, **kwargs)          # .forward skips the hooks: the unfiltered output
            raw = raw[0] if isinstance(raw, tuple) else raw
            out = seen[("out", i)]
            out = out[0] if isinstance(out, tuple) else out
            assert not torch.equal(out, raw)
            assert torch.equal(out, layer.task_filter(raw))


def test_with_the_filter_at_identity_it_is_exactly_peft_lora_on_o_gate_up_down():
    batch = make_batch()
    base = make_tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    tm = LoraTrfModel(base, make_config())
    assert tm.config.target_modules == TARGETS
    randomise_lora_B(tm.injected.values())
    with torch.no_grad():
        for task_filter in (m for m in tm.injected.values() if isinstance(m, TaskFilter)):
            task_filter.T2.zero_()
        for name, layer in tm.injected.items():
            if isinstance(layer, TaskFilter):
                continue
            assert name.rsplit(".", 1)[-1] in TARGETS
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.T)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.T)
    assert len(tm.injected) == 2 * len(TARGETS) + 2
    assert (logits(tm, batch) - logits(peft_model, batch)).abs().max() < 1e-5


@pytest.mark.parametrize("overrides, message", [
    (dict(r=0), "r must be"),
    (dict(filter_rank=0), "filter_rank"),
    (dict(lora_alpha=-1), "lora_alpha"),
    (dict(target_modules=[]), "target_modules"),
])
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)

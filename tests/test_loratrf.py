"""LoRATRF: the task-aware filter and its clamp against float64 loops, its placement on every decoder
layer's output, the LoRA part against PEFT, training, save/load, bad configs."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from comlora.loratrf import LoraTrfConfig, LoraTrfModel, TaskFilter, get_loratrf_model

from conftest import make_batch, make_tiny_llama

TARGETS = ["o_proj", "gate_proj", "up_proj", "down_proj"]


def make_config(**overrides):
    values = dict(r=4, lora_alpha=8, filter_rank=3, seed=3)
    values.update(overrides)
    return LoraTrfConfig(**values)


def randomise(model, seed=5):
    """B = 0 and T2 = 0 at init make LoRA and filter no-ops; give them non-zero weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.injected.values():
            target = module.T2 if isinstance(module, TaskFilter) else module.lora_B
            target.copy_(torch.randn(target.shape, generator=g) * 0.3)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


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
    tm = get_loratrf_model(make_tiny_llama(), make_config())
    randomise(tm)
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
    tm = get_loratrf_model(base, make_config())
    assert tm.config.target_modules == TARGETS
    randomise(tm)
    with torch.no_grad():
        for task_filter in (m for m in tm.injected.values() if isinstance(m, TaskFilter)):
            task_filter.T2.zero_()
        for name, layer in tm.injected.items():
            if isinstance(layer, TaskFilter):
                continue
            assert name.rsplit(".", 1)[-1] in TARGETS
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A[0].T)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B[0].T)
    assert len(tm.injected) == 2 * len(TARGETS) + 2
    assert (logits(tm, batch) - logits(peft_model, batch)).abs().max() < 1e-5


def test_fresh_model_gives_exactly_the_base_logits():
    batch = make_batch()
    expected = logits(make_tiny_llama(), batch)
    tm = get_loratrf_model(make_tiny_llama(), make_config())
    assert torch.equal(logits(tm, batch), expected)


def test_adamw_steps_lower_the_training_loss():
    batch = make_batch()
    tm = get_loratrf_model(make_tiny_llama(), make_config())
    tm.train()
    optimizer = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(6):
        loss, parts = tm.training_loss(**batch, step=step, total_steps=6)
        assert set(parts) == {"lm", "loss", "target_tokens"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(parts["loss"])
    assert losses[-1] < losses[0] - 0.05
    task_filter = tm.model.model.layers[0].task_filter
    assert task_filter.T2.grad is not None and task_filter.T2.grad.abs().max() > 0


def test_training_loss_without_any_target_token_raises():
    batch = make_batch()
    batch["labels"][:] = -100
    tm = get_loratrf_model(make_tiny_llama(), make_config())
    with pytest.raises(ValueError, match="no target token"):
        tm.training_loss(**batch, step=0, total_steps=1)


def test_parameter_counts_and_interface():
    base_params = sum(p.numel() for p in make_tiny_llama().parameters())
    tm = get_loratrf_model(make_tiny_llama(), make_config())
    c = tm.parameter_counts()
    shapes = [(32, 32), (32, 48), (32, 48), (48, 32)]     # o_proj, gate_proj, up_proj, down_proj
    assert c["adapter"] == 2 * sum(4 * (d_in + d_out) for d_in, d_out in shapes)
    assert c["router"] == 2 * (32 + 32 * 3 + 3 * 32)      # per decoder layer: t, T1, T2
    assert c["base"] == base_params
    assert c["adapter"] + c["router"] == sum(p.numel() for p in tm.parameters() if p.requires_grad)
    assert LoraTrfModel.mergeable is False
    tm.print_trainable_parameters()


def test_save_load_round_trip_is_bit_exact_and_a_different_base_is_refused(tmp_path):
    batch = make_batch()
    tm = get_loratrf_model(make_tiny_llama(), make_config())
    randomise(tm)
    tm.save(tmp_path / "state")
    loaded = LoraTrfModel.load(make_tiny_llama(), tmp_path / "state")
    assert loaded.config == tm.config
    assert torch.equal(logits(loaded, batch), logits(tm, batch))
    expected = r"model\.layers\.0\.task_filter\.T1: saved shape \[32, 3\], this model expects \[48, 3\]"
    with pytest.raises(ValueError, match=expected):
        LoraTrfModel.load(make_tiny_llama(hidden_size=48), tmp_path / "state")


@pytest.mark.parametrize("overrides, message", [
    (dict(r=0), "r must be"),
    (dict(filter_rank=0), "filter_rank"),
    (dict(lora_alpha=-1), "lora_alpha"),
    (dict(target_modules=[]), "target_modules"),
])
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_unknown_target_module_raises_listing_the_available_ones():
    with pytest.raises(ValueError, match=r"\['nope'\].*o_proj"):
        get_loratrf_model(make_tiny_llama(), make_config(target_modules=["o_proj", "nope"]))

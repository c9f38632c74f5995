"""ComLoraModel against PEFT, gradient semantics, merge, save/load and bad inputs, on tiny Llamas."""

import copy
import warnings

import pytest
import torch
from conftest import logits, make_batch, make_tiny_llama, randomise_lora_B
from peft import PeftModel
from transformers import LlamaForCausalLM

from comlora import ComLoraConfig, ComLoraModel
from comlora.methods.comlora.layer import ComLoraLinear

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def make_config(**overrides):
    values = dict(num_components=3, r=4, lora_alpha=8, top_n=2, target_modules=TARGETS, selector_heads=4,
                  selector_ffn_dim=64, selector_dropout=0.0, seed=3)
    values.update(overrides)
    return ComLoraConfig(**values)


def reference_per_sample_loss(logits, labels):
    """Plain masked mean NLL per sample from full logits (no shared code with the library)."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != -100
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    return nll.sum(1) / mask.sum(1)


def test_batched_competition_matches_peft_running_each_exported_component(tmp_path, batch):
    base = make_tiny_llama()
    reference_base = copy.deepcopy(base)
    cm = ComLoraModel(base, make_config())
    randomise_lora_B(cm.adapted.values())
    cm.eval()
    out = cm.competition_step(**batch, step=0, total_steps=10)
    for k in range(3):
        cm.export_adapter(tmp_path / f"c{k}", component=k)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(reference_base), tmp_path / f"c{k}").eval()
        assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
        peft_logits = logits(peft_model, batch)
        with cm.use_component(k):
            ours = logits(cm, batch)
        assert (ours - peft_logits).abs().max() < 1e-5
        expected = reference_per_sample_loss(peft_logits, batch["labels"])
        assert (out.per_sample_loss[:, k].double() - expected).abs().max() < 1e-5
    # the components really differ, so the comparison above is not vacuous
    assert (out.per_sample_loss[:, 0] - out.per_sample_loss[:, 1]).abs().max() > 1e-3


def test_exported_adapter_files_are_peft_format(tmp_path):
    cm = ComLoraModel(make_tiny_llama(), make_config())
    cm.export_adapter(tmp_path / "a", component=1)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match="select_winner"):
        cm.export_adapter(tmp_path / "b")
    with pytest.raises(ValueError, match="component must be"):
        cm.export_adapter(tmp_path / "b", component=3)


def grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def nonzero(grads_list):
    return any(g is not None and g.abs().sum() > 0 for g in grads_list)


def lora_grads(cm):
    return [p.grad for layer in cm.adapted.values() for p in (layer.lora_A, layer.lora_B)]


def run_step(cm, batch, **kwargs):
    cm.zero_grad(set_to_none=True)
    cm.competition_step(**batch, step=5, total_steps=10, **kwargs).loss.backward()


def test_base_gets_no_gradient_and_selector_only_from_pairwise(batch):
    cm = ComLoraModel(make_tiny_llama(), make_config())
    randomise_lora_B(cm.adapted.values())
    run_step(cm, batch)
    assert all(p.grad is None for n, p in cm.model.named_parameters() if ".lora_" not in n)
    assert nonzero(grads(cm.selector)) and nonzero(lora_grads(cm))

    cm.config.pairwise_loss = False                 # LM + alignment: no selector gradient
    run_step(cm, batch)
    assert not nonzero(grads(cm.selector)) and nonzero(lora_grads(cm))


@pytest.mark.parametrize("lm, align, pairwise, detach, components_learn", [
    (True, False, False, True, True),               # L_LM alone trains the components
    (False, True, False, True, True),               # L_align alone trains the components
    (False, False, True, True, False),              # detached pairwise: components get nothing
    (False, False, True, False, True),              # undetached pairwise (camera-ready) reaches them
])
def test_which_loss_trains_the_components(batch, lm, align, pairwise, detach, components_learn):
    cm = ComLoraModel(make_tiny_llama(), make_config(lm_loss=lm, align_loss=align, pairwise_loss=pairwise,
                                                          pairwise_detach_lm=detach))
    randomise_lora_B(cm.adapted.values())
    run_step(cm, batch)
    assert nonzero(lora_grads(cm)) == components_learn
    assert nonzero(grads(cm.selector)) == pairwise


def test_selector_learns_to_prefer_the_lowest_loss_component():
    """Only the pairwise loss, fixed per-component losses: the best component gets the highest similarity."""
    torch.manual_seed(0)
    cm = ComLoraModel(make_tiny_llama(), make_config(num_components=4, top_n=2))
    fixed = torch.tensor([1.3, 0.6, 1.9, 1.0])
    opt = torch.optim.Adam(cm.selector.parameters(), lr=1e-3)
    batch = make_batch(batch_size=6, seed=2)
    from comlora.methods.comlora.losses import add_noise, pairwise_loss
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        sim = cm.similarity(batch["input_ids"], batch["attention_mask"])
        loss = pairwise_loss(sim, add_noise(fixed.expand(6, 4), 0.1, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        sim = cm.similarity(batch["input_ids"], batch["attention_mask"])
    assert (sim.argmax(1) == 1).all()
    assert (sim.argsort(1, descending=True) == torch.tensor([1, 3, 0, 2])).all()


def test_merged_model_equals_the_component_and_costs_what_the_base_costs(batch):
    base = make_tiny_llama()
    fresh = make_tiny_llama()
    cm = ComLoraModel(base, make_config())
    randomise_lora_B(cm.adapted.values())
    with cm.use_component(2):
        expected = logits(cm, batch)
    merged = cm.merge(2)
    assert isinstance(merged, LlamaForCausalLM)
    got = logits(merged, batch)
    assert (got - expected).abs().max() < 1e-4
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in fresh.parameters())
    assert [type(m) for m in merged.modules()] == [type(m) for m in fresh.modules()]
    # not in place: the ComLoraModel keeps all components
    assert all(isinstance(layer, ComLoraLinear) for layer in cm.adapted.values())
    inplace = cm.merge(2, inplace=True)
    got_inplace = logits(inplace, batch)
    assert (got_inplace - expected).abs().max() < 1e-4
    assert not any(isinstance(m, ComLoraLinear) for m in inplace.modules())


def test_save_load_round_trip_is_bit_for_bit(tmp_path, batch):
    cm = ComLoraModel(make_tiny_llama(), make_config(noise_alpha=0.1))
    randomise_lora_B(cm.adapted.values())
    cm.winner = 1
    cm.save(tmp_path / "state")
    cm2 = ComLoraModel.load(make_tiny_llama(), tmp_path / "state")
    assert cm2.config == cm.config and cm2.winner == 1
    for model in (cm, cm2):
        model.eval()
    a = cm.competition_step(**batch, step=3, total_steps=10, generator=torch.Generator().manual_seed(7))
    b = cm2.competition_step(**batch, step=3, total_steps=10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.per_sample_loss, b.per_sample_loss)
    assert torch.equal(a.sim, b.sim)
    with torch.no_grad(), cm.use_component(1), cm2.use_component(1):
        assert torch.equal(cm(input_ids=batch["input_ids"]).logits, cm2(input_ids=batch["input_ids"]).logits)


def test_loading_onto_a_different_base_names_the_mismatched_modules(tmp_path):
    ComLoraModel(make_tiny_llama(), make_config()).save(tmp_path / "state")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A: saved shape \[3, 32, 4\], "
                                         r"this model expects \[3, 48, 4\]"):
        ComLoraModel.load(make_tiny_llama(hidden_size=48), tmp_path / "state")
    with pytest.raises(ValueError, match="missing model.layers.2"):
        ComLoraModel.load(make_tiny_llama(layers=3), tmp_path / "state")
    with pytest.raises(FileNotFoundError, match="comlora_config.json is missing"):
        ComLoraModel.load(make_tiny_llama(), tmp_path)


def test_absent_target_modules_list_what_exists():
    with pytest.raises(ValueError, match=r"\['qkv'\] match no linear module.*'down_proj'.*'q_proj'"):
        ComLoraModel(make_tiny_llama(), make_config(target_modules=["q_proj", "qkv"]))


def test_batch_without_any_target_token_raises(batch):
    cm = ComLoraModel(make_tiny_llama(), make_config())
    labels = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="no target token"):
        cm.competition_step(batch["input_ids"], batch["attention_mask"], labels, step=0, total_steps=1)


def test_a_sample_without_target_tokens_is_left_out_not_nan(batch):
    cm = ComLoraModel(make_tiny_llama(), make_config(noise_alpha=0.0))
    randomise_lora_B(cm.adapted.values())
    cm.eval()
    labels = batch["labels"].clone()
    labels[1] = -100
    out = cm.competition_step(batch["input_ids"], batch["attention_mask"], labels, step=2, total_steps=4)
    keep = [0, 2]
    ref = cm.competition_step(batch["input_ids"][keep], batch["attention_mask"][keep], labels[keep], step=2,
                              total_steps=4)
    assert torch.isfinite(out.loss) and out.valid.tolist() == [True, False, True]
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
    assert out.per_sample_loss[1].abs().sum() == 0


def test_forward_requires_a_component_and_modes_are_restored(batch):
    cm = ComLoraModel(make_tiny_llama(), make_config())
    with pytest.raises(RuntimeError, match="use_component"):
        cm(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="component must be"):
        cm.use_component(5)
    with cm.use_component(1):
        pass
    layer = next(iter(cm.adapted.values()))
    assert layer.active_component is None and not layer.competition


def test_select_winner_accumulates_similarity_and_validation_losses(batch):
    cm = ComLoraModel(make_tiny_llama(), make_config())
    randomise_lora_B(cm.adapted.values())
    batches = [make_batch(seed=s) for s in range(3)]
    report = cm.select_winner(batches)
    expected_sim = sum(cm.similarity(b["input_ids"], b["attention_mask"]).sum(0) for b in batches)
    assert report.similarity == pytest.approx(expected_sim.tolist(), rel=1e-5)
    assert report.winner == report.winner_by_similarity == int(expected_sim.argmax())
    losses = torch.cat([cm.component_losses(**b)[0] for b in batches])
    assert report.val_loss == pytest.approx(losses.mean(0).tolist(), rel=1e-5)
    assert report.winner_by_loss == int(losses.mean(0).argmin()) and cm.winner == report.winner
    assert report.num_samples == 9


def mixed_length_batches(lengths, batch_size: int, seed: int = 7):
    """Right-padded batches (pad id 0) of random rows of the given lengths, the first 3 tokens of each a prompt."""
    from comlora.data.items import collate

    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return [collate(rows[s:s + batch_size], 0) for s in range(0, len(rows), batch_size)]


def test_select_winner_equals_a_per_sample_recomputation_with_less_padding_and_a_progress_bar(capsys):
    """Winner selection regroups the validation rows by length (issue 25, item 6): the decoder sees no padding here,
    and the report equals each sample run alone through the full model (full-vocabulary logits, float64 NLL)."""
    cm = ComLoraModel(make_tiny_llama(), make_config())
    randomise_lora_B(cm.adapted.values())
    cm.eval()
    lengths = [21, 6, 21, 6, 14, 6, 21, 14, 6, 14, 21]        # batches of 2 mix long and short rows
    batches = mixed_length_batches(lengths, batch_size=2)
    positions = []
    hook = cm.model.get_input_embeddings().register_forward_pre_hook(lambda _, args: positions.append(args[0].numel()))
    report = cm.select_winner(batches, progress=True)
    hook.remove()
    selector_positions = sum(lengths)                # the selector's embedding lookup, once per sample
    assert sum(positions) - selector_positions == 3 * sum(lengths)     # K copies of each row, no padding
    padded = sum(3 * b["input_ids"].numel() for b in batches)
    assert sum(positions) - selector_positions < padded                # what per-batch selection ran
    bar = capsys.readouterr().err
    assert "winner selection" in bar and f"{len(lengths)}/{len(lengths)}" in bar

    sims, losses = [], []
    with torch.no_grad():
        for b in batches:
            for i in range(b["input_ids"].shape[0]):
                n = int(b["attention_mask"][i].sum())
                ids, labels = b["input_ids"][i:i + 1, :n], b["labels"][i:i + 1, :n]
                sims.append(cm.similarity(ids, torch.ones_like(ids))[0])
                per_component = []
                for k in range(3):
                    with cm.use_component(k):
                        per_component.append(reference_per_sample_loss(cm(input_ids=ids).logits, labels)[0])
                losses.append(torch.stack(per_component))
    expected_sim, expected_loss = torch.stack(sims).double().sum(0), torch.stack(losses).mean(0)
    assert report.similarity == pytest.approx(expected_sim.tolist(), rel=1e-5)
    assert report.val_loss == pytest.approx(expected_loss.tolist(), rel=1e-5)
    assert report.winner == int(expected_sim.argmax()) and report.winner_by_loss == int(expected_loss.argmin())
    assert report.num_samples == len(lengths)


def test_select_winner_keeps_batches_that_are_not_right_padded():
    from comlora.methods.comlora.model import regroup_by_length

    batch = mixed_length_batches([9, 5], batch_size=2)[0]
    left = {k: torch.stack([row.roll(int((batch["attention_mask"][i] == 0).sum())) for i, row in enumerate(v)])
            for k, v in batch.items()}
    assert not torch.equal(left["attention_mask"], batch["attention_mask"])
    assert regroup_by_length([left])[0] is left


def test_without_selector_the_winner_is_the_lowest_validation_loss(batch):
    cm = ComLoraModel(make_tiny_llama(), make_config(use_selector=False, align_loss=False, pairwise_loss=False))
    randomise_lora_B(cm.adapted.values())
    assert cm.selector is None
    out = cm.competition_step(**batch, step=0, total_steps=1)
    assert out.sim is None and out.loss.item() == pytest.approx(out.parts["lm"])
    report = cm.select_winner([batch])
    assert report.winner == report.winner_by_loss == int(torch.tensor(report.val_loss).argmin())


def test_parameter_counts(capsys):
    cm = ComLoraModel(make_tiny_llama(), make_config())
    counts = cm.parameter_counts()
    # per layer: q(32->32) k(32->16) v(32->16) up(32->48) down(48->32); 2 layers, K=3, r=4
    per_layer = sum(4 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 48), (48, 32)])
    assert counts["adapter"] == 2 * 3 * per_layer
    assert counts["base"] == sum(p.numel() for p in make_tiny_llama().parameters())
    cm.print_trainable_parameters()
    assert "LoRA 7,680 (" in capsys.readouterr().out


@pytest.mark.parametrize("detach", [True, False])
def test_low_memory_competition_gives_the_batched_gradients(batch, detach):
    """Same noise draw, dropout off: every LoRA and selector gradient equals the batched mode's (< 1e-5)."""
    grads_by_mode = {}
    for mode in ("batched", "low_memory"):
        cm = ComLoraModel(make_tiny_llama(), make_config(competition=mode, pairwise_detach_lm=detach))
        randomise_lora_B(cm.adapted.values())
        out = cm.competition_step(**batch, step=4, total_steps=10, generator=torch.Generator().manual_seed(11))
        out.loss.backward()
        grads_by_mode[mode] = (out.loss.detach(), {n: p.grad.clone() for n, p in cm.named_parameters()
                                                   if p.requires_grad and p.grad is not None})
    (loss_a, a), (loss_b, b) = grads_by_mode["batched"], grads_by_mode["low_memory"]
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert a.keys() == b.keys() and any("lora_A" in n for n in a) and any("selector" in n for n in a)
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-5, name


def test_single_component_has_no_selector_and_trains_plain_lora_objective(batch):
    cm = ComLoraModel(make_tiny_llama(), make_config(num_components=1, top_n=1))
    randomise_lora_B(cm.adapted.values())
    assert cm.selector is None and cm.parameter_counts()["router"] == 0
    out = cm.competition_step(**batch, step=5, total_steps=10)
    lm = out.per_sample_loss[out.valid, 0].mean()
    assert out.loss.item() == pytest.approx(lm.item(), rel=1e-6)      # L_LM alone, not (1 + eta) L_LM
    assert "align" not in out.parts and "pairwise" not in out.parts


def test_without_pairwise_loss_the_winner_is_still_the_selectors_pick(batch):
    cm = ComLoraModel(make_tiny_llama(), make_config(pairwise_loss=False))
    randomise_lora_B(cm.adapted.values())
    report = cm.select_winner([batch])
    assert report.winner == report.winner_by_similarity and report.winner_by_loss is not None


def test_an_in_place_merge_consumes_the_model_with_a_clear_error(batch):
    cm = ComLoraModel(make_tiny_llama(), make_config())
    cm.merge(0, inplace=True)
    with pytest.raises(RuntimeError, match="merged in place"):
        with cm.use_component(0):
            pass


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_layer_output_matches_a_float64_recomputation(dtype, tolerance):
    """y = W0 x + b + (alpha/r) x A_k B_k, for the K-way competition batch and for one active component,
    on a float32 base (the fused path) and on a bfloat16 base with float32 LoRA weights."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12).to(dtype)
    layer = ComLoraLinear(base, num_components=3, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3 * 2, 5, 16).to(dtype)

    def expected(rows, k):
        h = x[rows].double()
        return (h @ base.weight.double().T + base.bias.double()
                + 2.0 * h @ layer.lora_A[k].double() @ layer.lora_B[k].double())

    layer.competition = True
    y = layer(x)
    reference = torch.cat([expected(slice(2 * k, 2 * k + 2), k) for k in range(3)])
    assert y.dtype == dtype and torch.allclose(y.double(), reference, atol=tolerance, rtol=tolerance)
    layer.competition, layer.active_component = False, 1
    y = layer(x)
    assert y.dtype == dtype and torch.allclose(y.double(), expected(slice(None), 1), atol=tolerance, rtol=tolerance)

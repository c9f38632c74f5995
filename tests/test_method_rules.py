"""The method's rules across ablations: zero weight = switch off, K=1 = plain LoRA, one top_n default,
the winner rule, and the early decision (decide_at)."""

import json
import shutil

import pytest
import torch
from conftest import make_batch, make_tiny_llama, randomise_lora_B
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from comlora import ComLoraConfig, ComLoraModel
from comlora.methods.comlora.export import peft_adapter_state
from comlora.methods.registry import method_config
from comlora.training.config import TrainConfig
from comlora.training.loop import train

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def make_config(**overrides):
    values = dict(num_components=3, r=4, lora_alpha=8, target_modules=TARGETS, selector_heads=4,
                  selector_ffn_dim=64, selector_dropout=0.0, seed=3)
    values.update(overrides)
    return ComLoraConfig(**values)


def train_steps(cm, steps=3, lr=1e-2):
    """A few AdamW steps on fixed batches with a fixed noise stream; returns every trainable tensor."""
    opt = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        out = cm.competition_step(**make_batch(seed=step), step=step, total_steps=steps, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in cm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("term", ["lm", "align", "pairwise"])
def test_a_zero_weight_trains_exactly_like_the_switch_off(term):
    off = ComLoraModel(make_tiny_llama(), make_config(**{f"{term}_loss": False}))
    zero = ComLoraModel(make_tiny_llama(), make_config(**{f"{term}_weight": 0.0}))
    for cm in (off, zero):
        randomise_lora_B(cm.adapted.values())
    a, b = train_steps(off), train_steps(zero)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    batches = [make_batch(seed=s) for s in range(2)]
    assert off.select_winner(batches) == zero.select_winner(batches)


def test_without_pairwise_loss_the_winner_is_the_selectors_pick_and_the_loss_pick_is_beside_it():
    for overrides in ({"pairwise_loss": False}, {"pairwise_weight": 0.0}, {}):
        cm = ComLoraModel(make_tiny_llama(), make_config(**overrides))
        randomise_lora_B(cm.adapted.values())
        report = cm.select_winner([make_batch(seed=s) for s in range(2)])
        sim = torch.tensor(report.similarity)
        assert report.winner == report.winner_by_similarity == int(sim.argmax())
        assert report.winner_by_loss == int(torch.tensor(report.val_loss).argmin())


def test_top_n_defaults_to_k_in_the_library_and_the_command_line():
    assert ComLoraConfig(num_components=4).top_n == 4
    assert ComLoraConfig(num_components=2).top_n == 2
    assert ComLoraConfig(num_components=4, top_n=1).top_n == 1
    assert method_config(TrainConfig(num_components=4)).top_n == ComLoraConfig(num_components=4).top_n == 4


def equal_target_batch(seed):
    """Every sample has the same number of target tokens: the per-sample mean of each sample averaged equals
    PEFT's (transformers') mean over all target tokens."""
    batch = make_batch(batch_size=4, length=10, seed=seed)
    batch["attention_mask"][:] = 1
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :4] = -100
    return batch


def test_single_component_trains_the_same_weights_as_peft_lora():
    """ComLoRA K=1 and PEFT LoRA from the same initial A: equal weights after several AdamW steps."""
    cm = ComLoraModel(make_tiny_llama(), make_config(num_components=1, lora_dropout=0.0))
    peft_model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                lora_dropout=0.0, bias="none"))
    with torch.no_grad():
        for name, layer in cm.adapted.items():
            layer.lora_A[0].copy_(peft_model.base_model.model.get_submodule(name).lora_A["default"].weight.T)
    ours = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
    theirs = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(4):
        batch = equal_target_batch(step)
        out = cm.competition_step(**batch, step=step, total_steps=4)
        reference = peft_model(**batch).loss
        assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
        for opt, loss in ((ours, out.loss), (theirs, reference)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    a, b = peft_adapter_state(cm, 0), get_peft_model_state_dict(peft_model)
    assert a.keys() == b.keys() and len(a) == 2 * 2 * len(TARGETS)
    assert any(b[k].abs().max() > 0 for k in b if "lora_B" in k)          # it did train
    # float32 round-off through Adam's normalisation: differences of ~1e-5 against updates of ~1e-2 (lr 1e-2, 4 steps)
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-4, key
    assert max(float(b[k].abs().max()) for k in b if "lora_B" in k) > 1e-2


def test_a_decided_model_trains_the_winner_alone_on_its_lm_loss():
    cm = ComLoraModel(make_tiny_llama(), make_config())
    randomise_lora_B(cm.adapted.values())
    batch = make_batch()
    with torch.no_grad():
        expected = cm.component_losses(**batch)[0][:, 1].mean()
    cm.decided = 1
    out = cm.competition_step(**batch, step=2, total_steps=4)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6) and out.sim is None
    out.loss.backward()
    layer = next(iter(cm.adapted.values()))
    assert layer.lora_B.grad[1].abs().max() > 0
    assert layer.lora_B.grad[0].abs().max() == 0 and layer.lora_B.grad[2].abs().max() == 0
    assert all(p.grad is None for p in cm.selector.parameters())
    assert cm.select_winner([batch]).winner == 1


def decide_values(tiny_model_dir, commonsense_root, **overrides):
    values = dict(model=str(tiny_model_dir), data_root=str(commonsense_root), device="cpu", train_per_task=4,
                  val_size=4, eval_size=4, batch_size=4, grad_accum=1, max_steps=6, lr=0.01, lora_dropout=0.1,
                  save_every=1, method_options={"selector_heads": 4, "selector_ffn_dim": 32, "decide_at": 0.5})
    values.update(overrides)
    return values


def test_early_decision_run_resumes_exactly_and_freezes_the_losers(tmp_path, tiny_model_dir, commonsense_root):
    values = decide_values(tiny_model_dir, commonsense_root)
    straight = train(TrainConfig(out=str(tmp_path / "straight"), **values))
    decision = json.loads((straight / "decision.json").read_text())
    winner = json.loads((straight / "winner.json").read_text())
    assert decision["decided_at_step"] == 3 and winner["winner"] == decision["winner"]
    assert winner["decided_at_step"] == 3
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all("component_loss" in r for r in rows[:3]) and not any("component_loss" in r for r in rows[3:])
    assert (straight / "loss_curves.png").is_file() and (straight / "lowest_loss_share.png").is_file()

    for stop in (3, 4):               # killed just before the decision, and after it
        run = tmp_path / f"stopped-{stop}"
        cfg = TrainConfig(out=str(run), **values)
        train(cfg, stop_after=stop)
        state_at_stop = json.loads((run / "checkpoints" / f"step-{stop:08d}" / "trainer_state.json").read_text())
        assert state_at_stop["decided"] == (None if stop == 3 else decision["winner"])
        shutil.copytree(run / "checkpoints", tmp_path / f"kept-{stop}")
        train(cfg, resume=True)
        a = load_file(str(straight / "state" / "comlora_model.safetensors"))
        b = load_file(str(run / "state" / "comlora_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # after the decision the losers and the selector no longer move (zeroed momentum, no gradient)
    final = load_file(str(straight / "state" / "comlora_model.safetensors"))
    losers = [k for k in range(2) if k != decision["winner"]]          # K = 2 (TrainConfig's default)
    decided_state = load_file(str(tmp_path / "kept-3" / "step-00000003" / "trainable.safetensors"))
    moved = []
    for name, before in decided_state.items():
        short = next(k for k in final if name.endswith(k))
        if ".lora_" in name:
            for k in losers:
                assert torch.equal(before[k], final[short][k]), name
            moved.append(not torch.equal(before[decision["winner"]], final[short][decision["winner"]]))
        else:
            assert torch.equal(before, final[short]), name
    assert any(moved)


LLAMA3_8B_PARAMETERS = 8_030_261_248      # Meta-Llama-3-8B, its safetensors index (the paper's base model)


@pytest.mark.parametrize("ffn_dim, share", [(2048, 1.045), (6016, 1.450)])
def test_selector_share_of_llama3_8b_as_stated_in_the_docs(ffn_dim, share):
    """The selector on LLaMA-3-8B (d = 4096, K = 2, 8 heads): attention 4 d^2 + 4 d, feed-forward 2 d f + f + d,
    two layer norms 4 d, embeddings K d. The default (f = 2048) is 1.05%; f = 6016 gives the paper's 1.45%."""
    from comlora.methods.comlora.selector import LoraSelector

    with torch.device("meta"):
        selector = LoraSelector(4096, 2, num_heads=8, ffn_dim=ffn_dim)
    d = 4096
    by_hand = 4 * d * d + 4 * d + 2 * d * ffn_dim + ffn_dim + d + 4 * d + 2 * d
    assert sum(p.numel() for p in selector.parameters()) == by_hand
    assert 100 * by_hand / LLAMA3_8B_PARAMETERS == pytest.approx(share, abs=5e-4)

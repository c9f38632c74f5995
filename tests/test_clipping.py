"""Gradient clipping (training/clipping.py, TrainConfig.clip_grad): joint or per parameter group, in the loop and
its logs, the refusals, and the configs that must keep Study I's joint clipping (tiny models, seconds)."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType
from conftest import make_batch, make_moelora_config, make_tiny_llama, randomise_lora_B
from safetensors.torch import load_file

from comlora import ComLoraConfig, ComLoraModel
from comlora.methods.moelora import MoeLoraModel
from comlora.training.clipping import (
    clip_gradients,
    clip_with_accelerator,
    gradient_groups,
    refuse_unsupported_clipping,
)
from comlora.training.config import TrainConfig
from comlora.training.distributed import refuse_unsupported_sharded_options

COMLORA = dict(num_components=2, r=4, lora_alpha=8, top_n=2, selector_heads=4, selector_ffn_dim=32,
               selector_dropout=0.0, noise_alpha=0.0, lora_dropout=0.0, seed=3)
MAX_NORM = 1e-3             # far below every group's norm on the tiny model: clipping is active in every group


def comlora(**overrides):
    cm = ComLoraModel(make_tiny_llama(seed=0), ComLoraConfig(**{**COMLORA, **overrides}))
    randomise_lora_B(cm.adapted.values())          # lora_A gets a gradient too
    return cm.train()


def backward(method, batch):
    method.zero_grad(set_to_none=True)
    loss, _ = method.training_loss(batch["input_ids"], batch["attention_mask"], batch["labels"], 3, 10)
    loss.backward()


def trainable(method):
    return {n: p for n, p in method.named_parameters() if p.requires_grad}


def clipped_step(pairwise_weight: float, mode: str):
    """One competition step's gradients clipped as ``mode`` says, then one AdamW step: (norms before clipping,
    clipped gradients, weights after the step), by tensor name."""
    cm = comlora(pairwise_weight=pairwise_weight)
    backward(cm, make_batch())
    params = list(trainable(cm).values())
    norms = clip_gradients(params, gradient_groups(cm, params), MAX_NORM, mode)
    grads = {n: p.grad.clone() for n, p in trainable(cm).items()}
    torch.optim.AdamW(params, lr=1e-2).step()
    return norms, grads, {n: p.detach().clone() for n, p in trainable(cm).items()}


def test_per_group_clipping_shields_the_components_from_the_pairwise_loss_joint_does_not():
    """Only L_pairwise reaches the selector; multiplying its weight by 100 multiplies the selector's gradient.
    Per group, the components' clipped gradients and their AdamW update stay bit-identical; jointly they shrink."""
    steps = {(w, mode): clipped_step(w, mode) for w in (1.0, 100.0) for mode in ("per_group", "joint")}
    norms, _, _ = steps[(1.0, "per_group")]
    assert norms["grad_norm_adapter"] > MAX_NORM and norms["grad_norm_router"] > MAX_NORM      # clipping is active
    big, _, _ = steps[(100.0, "per_group")]
    assert big["grad_norm_adapter"] == norms["grad_norm_adapter"]          # the components' raw gradient: the same
    assert big["grad_norm_router"] == pytest.approx(100 * norms["grad_norm_router"], rel=1e-3)
    components = [n for n in steps[(1.0, "per_group")][1] if ".lora_" in n]
    assert components and any(n.startswith("selector.") for n in steps[(1.0, "per_group")][1])
    for mode, same in (("per_group", True), ("joint", False)):
        (_, grads_1, weights_1), (_, grads_100, weights_100) = steps[(1.0, mode)], steps[(100.0, mode)]
        for name in components:
            assert torch.equal(grads_1[name], grads_100[name]) is same, (mode, name)
            assert torch.equal(weights_1[name], weights_100[name]) is same, (mode, name)
    # jointly, the components' gradient is scaled by c / ||g||, which the selector's norm sets
    _, joint_1, _ = steps[(1.0, "joint")]
    _, joint_100, _ = steps[(100.0, "joint")]
    ratio = float(torch.linalg.vector_norm(torch.cat([joint_100[n].flatten() for n in components]))
                  / torch.linalg.vector_norm(torch.cat([joint_1[n].flatten() for n in components])))
    total_1, total_100 = steps[(1.0, "joint")][0]["grad_norm"], steps[(100.0, "joint")][0]["grad_norm"]
    assert ratio == pytest.approx(total_1 / total_100, rel=1e-4) and ratio < 0.05


@pytest.mark.parametrize("mode", ["per_group", "joint"])
def test_clipping_against_a_float64_recomputation(mode):
    """g <- g * min(1, c / (||g|| + 1e-6)) with ||g|| over every tensor (joint) or over its group (per_group),
    recomputed in float64 from the gradients before clipping; the returned norms are those before clipping."""
    cm = comlora()
    backward(cm, make_batch())
    named = trainable(cm)
    raw = {n: p.grad.double().clone() for n, p in named.items()}
    group_of = {n: "router" if n.startswith("selector.") else "adapter" for n in named}
    norm = {g: sum(float(raw[n].pow(2).sum()) for n in raw if group_of[n] == g) ** 0.5 for g in ("adapter", "router")}
    total = (norm["adapter"] ** 2 + norm["router"] ** 2) ** 0.5
    params = list(named.values())
    c = 0.05
    norms = clip_gradients(params, gradient_groups(cm, params), c, mode)
    assert set(norms) == {"grad_norm", "grad_norm_adapter", "grad_norm_router"}
    assert norms["grad_norm"] == pytest.approx(total, rel=1e-6)
    for g in ("adapter", "router"):
        assert norms[f"grad_norm_{g}"] == pytest.approx(norm[g], rel=1e-6)
    for n, p in named.items():
        by = total if mode == "joint" else norm[group_of[n]]
        expected = raw[n] * min(1.0, c / (by + 1e-6))
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("build", ["comlora", "moelora"])
def test_joint_clipping_is_accelerates_bit_for_bit(build):
    """joint reproduces Study I, which clipped with Accelerator.clip_grad_norm_ over the trainable tensors: the same
    norm and bit-identical gradients (MoELoRA: router and expert tensors interleaved in the parameter order)."""
    method = comlora() if build == "comlora" else MoeLoraModel(make_tiny_llama(seed=0), make_moelora_config())
    if build == "moelora":
        randomise_lora_B(method.injected.values())
    backward(method, make_batch())
    other = copy.deepcopy(method)
    accelerator = Accelerator(cpu=True)
    ours, theirs = list(trainable(method).values()), list(trainable(other).values())
    for a, b in zip(ours, theirs):
        b.grad = a.grad.clone()
    norms = clip_with_accelerator(accelerator, ours, gradient_groups(method, ours), 0.01, "joint")
    assert norms["grad_norm"] == float(accelerator.clip_grad_norm_(theirs, 0.01))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert set(gradient_groups(method, ours)) == {"adapter", "router"}


def test_a_trainable_tensor_in_no_group_is_named():
    cm = comlora()
    stray = torch.nn.Parameter(torch.zeros(3))
    cm.register_parameter("stray", stray)
    with pytest.raises(ValueError, match=r"trainable tensors in no parameter group.*\['stray'\]"):
        gradient_groups(cm, list(trainable(cm).values()))


# ---- the loop ---------------------------------------------------------------------------------------------
def loop_config(tmp_path, model_dir, data_root, name, **extra):
    values = dict(model=str(model_dir), data_root=str(data_root), device="cpu", train_per_task=2, val_size=4,
                  eval_size=4, batch_size=4, grad_accum=2, max_steps=3, lr=0.01, max_grad_norm=0.05)
    if extra.get("method", "comlora") == "comlora":
        values["method_options"] = {"selector_heads": 4, "selector_ffn_dim": 32}
    return TrainConfig(out=str(tmp_path / name), **{**values, **extra})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_loop_logs_each_groups_norm_before_clipping_as_recomputed(tmp_path, tiny_model_dir, commonsense_root,
                                                                     monkeypatch):
    """metrics.jsonl's grad_norm_adapter / grad_norm_router / grad_norm equal the norms recomputed (float64, groups
    by tensor name) from the gradients the loop clips; after clipping each group's norm is at most max_grad_norm."""
    import comlora.training.loop as loop

    built, seen = [], []
    real_build, real_clip = loop.build_method, loop.clip_with_accelerator

    def build_method(cfg, model):
        built.append(real_build(cfg, model))
        return built[-1]

    def clip(accelerator, params, groups, max_norm, mode):
        named = trainable(built[0])
        adapter = [p for n, p in named.items() if ".lora_" in n]
        router = [p for n, p in named.items() if ".lora_" not in n]
        norm = lambda ps: sum(float(p.grad.double().pow(2).sum()) for p in ps) ** 0.5  # noqa: E731
        seen.append({"grad_norm": norm(adapter + router), "grad_norm_adapter": norm(adapter),
                     "grad_norm_router": norm(router)})
        result = real_clip(accelerator, params, groups, max_norm, mode)
        assert norm(adapter) <= max_norm * (1 + 1e-5) and norm(router) <= max_norm * (1 + 1e-5)
        return result

    monkeypatch.setattr(loop, "build_method", build_method)
    monkeypatch.setattr(loop, "clip_with_accelerator", clip)
    run = loop.train(loop_config(tmp_path, tiny_model_dir, commonsense_root, "run"))
    rows = metrics(run)
    assert len(rows) == len(seen) == 3
    for row, expected in zip(rows, seen):
        assert expected["grad_norm_adapter"] > 0.05 and expected["grad_norm_router"] > 0.05     # both were clipped
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-5), key


def test_plain_lora_trains_bit_for_bit_the_same_under_both_modes(tmp_path, tiny_model_dir, commonsense_root):
    runs = {mode: loop_config(tmp_path, tiny_model_dir, commonsense_root, mode, method="lora", clip_grad=mode)
            for mode in ("per_group", "joint")}
    from comlora.training.loop import train

    states, logs = {}, {}
    for mode, cfg in runs.items():
        run = train(cfg)
        states[mode] = load_file(str(run / "state" / "adapter_model.safetensors"))
        logs[mode] = [{k: v for k, v in row.items() if k not in ("tokens_per_s", "step_seconds", "peak_rss_mb")}
                      for row in metrics(run)]
    assert states["joint"].keys() == states["per_group"].keys()
    assert all(torch.equal(states["joint"][k], states["per_group"][k]) for k in states["joint"])
    assert logs["joint"] == logs["per_group"]
    assert all(row["grad_norm_adapter"] == row["grad_norm"] > 0.05 for row in logs["joint"])   # one group, clipped
    assert all("grad_norm_router" not in row for row in logs["joint"])


# ---- refusals and configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, fsdp2, message", [
    (DistributedType.DEEPSPEED, False, "clip_grad per_group cannot run under DeepSpeed: its engine clips the whole "
                                       "gradient itself"),
    (DistributedType.FSDP, False, "clip_grad per_group needs FSDP2 (fsdp_version: 2 in the accelerate config)"),
])
def test_per_group_is_refused_where_a_groups_norm_is_not_whole(kind, fsdp2, message):
    accelerator = SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2)
    with pytest.raises(ValueError) as err:
        refuse_unsupported_clipping(accelerator, "per_group")
    assert message in str(err.value) and "comlora train --clip-grad joint" in str(err.value)
    refuse_unsupported_clipping(accelerator, "joint")               # joint runs as before
    cfg = TrainConfig()                                             # the loop's check refuses the default
    with pytest.raises(ValueError, match="clip_grad per_group"):
        refuse_unsupported_sharded_options(accelerator, cfg)
    refuse_unsupported_clipping(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True), "per_group")


def test_clip_grad_option():
    from comlora.cli import build_parser, train_config_from_args

    assert TrainConfig().clip_grad == "per_group"
    with pytest.raises(ValueError, match="TrainConfig: clip_grad must be one of per_group, joint, got 'both'"):
        TrainConfig(clip_grad="both")
    args = build_parser().parse_args(["train", "--clip-grad", "joint"])
    assert train_config_from_args(args).clip_grad == "joint"
    with pytest.raises(ValueError, match="clip_grad must be one of"):
        clip_gradients([], {}, 1.0, "both")


def test_study_one_and_the_demo_keep_joint_clipping():
    """Study I's recorded runs clipped jointly: every experiment of experiments/study resolves to joint, as the
    demo's configs do; its recorded config.yaml files (written before clip_grad existed) read as joint."""
    from comlora.study.experiments import load_experiments, train_config
    from comlora.training.finished_run import run_config

    base, experiments = load_experiments("experiments/study")
    trained = [e for e in experiments if e.train is not None]
    assert len(trained) > 20
    for exp in trained:
        cfg = train_config(base, exp, exp.seeds[0], "/nonexistent")
        assert (cfg.clip_grad, cfg.max_grad_norm) == ("joint", 1.0), exp.name
    for name in ("demo-comlora.yaml", "demo-lora.yaml"):
        assert yaml.safe_load(Path("experiments", name).read_text())["clip_grad"] == "joint"
    recorded = Path("experiments/results/study/t3-comlora-k2-r8/seed-0")
    assert "clip_grad" not in yaml.safe_load((recorded / "config.yaml").read_text())
    assert run_config(recorded).clip_grad == "joint"


def test_a_run_older_than_clip_grad_resumes_joint_only(tmp_path):
    """A config.yaml without clip_grad was trained jointly: resuming it with today's default is refused with the
    command that keeps its clipping, and that command's options pass."""
    from comlora.training.safe_run_dir import check_run_dir

    run = tmp_path / "run"
    run.mkdir()
    values = TrainConfig(out=str(run)).to_dict()
    del values["clip_grad"]
    (run / "config.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError) as err:
        check_run_dir(TrainConfig.from_dict(values), resume=True)
    assert "differ from the run's config.yaml in ['clip_grad']" in str(err.value)
    assert f"comlora train --resume --config {run / 'config.yaml'} --set clip_grad=joint --out {run}" in str(err.value)
    check_run_dir(TrainConfig.from_dict({**values, "clip_grad": "joint"}), resume=True)

import pytest
from conftest import make_tiny_llama

from comlora import ComLoraConfig, ComLoraModel


@pytest.mark.parametrize("kwargs, message", [
    ({"num_components": 0}, "num_components"),
    ({"num_components": 2, "top_n": 3}, "top_n must be in 1..K=2"),
    ({"num_components": 4, "top_n": 0}, "top_n"),
    ({"r": 0}, "r must be"),
    ({"anneal": "sigmoid"}, "unknown annealing schedule 'sigmoid'"),
    ({"loss_reduction": "median"}, "loss_reduction"),
    ({"pairwise_direction": "backwards"}, "pairwise_direction"),
    ({"align_sign": 0}, "align_sign"),
    ({"use_selector": False}, "use_selector=False"),
    ({"lm_loss": False, "align_loss": False, "pairwise_loss": False}, "at least one"),
    ({"selector_dim": 30, "selector_heads": 8}, "not divisible"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
])
def test_bad_config_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ComLoraConfig(**kwargs)


def test_defaults_are_the_specs():
    cfg = ComLoraConfig()
    assert (cfg.noise_alpha, cfg.anneal, cfg.anneal_rate, cfg.loss_reduction) == (0.1, "exponential", 5.0, "mean")
    assert (cfg.pairwise_direction, cfg.pairwise_detach_lm, cfg.align_sign) == ("intended", True, 1)
    assert cfg.target_modules is None          # resolved against the model: q,k,v,up,down on a Llama
    cm = ComLoraModel(make_tiny_llama(), cfg)
    assert cm.config.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert cfg.target_modules is None          # the user's config is not changed
    assert cfg.scaling == cfg.lora_alpha / cfg.r


def test_every_field_has_help():
    from dataclasses import fields
    assert all(f.metadata.get("help") for f in fields(ComLoraConfig))


def test_round_trip_and_unknown_field():
    cfg = ComLoraConfig(num_components=4, top_n=3, anneal="cosine")
    assert ComLoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        ComLoraConfig.from_dict({"num_component": 2})


def test_numbers_written_as_strings_are_converted_and_bad_ones_named():
    from comlora.training.config import TrainConfig
    from comlora.training.distributed import with_launcher_mixed_precision

    assert TrainConfig.from_dict({"lr": "3e-4"}).lr == 3e-4               # PyYAML reads 3e-4 as a string
    assert ComLoraConfig.from_dict({"noise_alpha": "1e-1"}).noise_alpha == 0.1
    with pytest.raises(ValueError, match="lr must be a number, got 'fast'"):
        TrainConfig.from_dict({"lr": "fast"})
    with pytest.raises(ValueError, match="num_components must be a number"):
        TrainConfig.from_dict({"num_components": True})
    assert TrainConfig.from_dict({"tasks": "boolq"}).tasks == ["boolq"]
    with pytest.raises(ValueError, match="retain_cpu_memory must be true or false, got 'sometimes'"):
        TrainConfig.from_dict({"retain_cpu_memory": "sometimes"})
    with pytest.raises(ValueError, match="float16 training"):
        TrainConfig(dtype="float16", mixed_precision="no")
    with pytest.raises(ValueError, match="float16 training"):      # unset: checked once resolved (here: no launcher)
        with_launcher_mixed_precision(TrainConfig(dtype="float16"), {})
    with pytest.raises(ValueError, match="val_size"):
        TrainConfig(val_size=0)


def test_single_component_trains_plain_lora_objective_so_needs_the_lm_loss():
    with pytest.raises(ValueError, match="with K=1 the objective is L_LM alone"):
        ComLoraConfig(num_components=1, top_n=1, lm_loss=False, align_loss=False)
    with pytest.raises(ValueError, match="with K=1 the objective is L_LM alone"):
        ComLoraConfig(num_components=1, lm_weight=0.0)

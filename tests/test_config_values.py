"""Config values that cannot be right are refused naming the key: non-finite numbers, negative
weight decay or thread counts, and keys repeated in a YAML mapping."""

from __future__ import annotations

import pytest

from sparsefusion.config import ConfigError, load_yaml, merge, parse_overrides
from sparsefusion.runs.config import TrainConfig
from sparsefusion.train.optim import OptimConfig


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.grad_clip=.nan", "optim.grad_clip"),
        ("objective.z_loss=.nan", "objective.z_loss"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.eps=0", "optim.eps"),
        ("train.threads=-3", "train.threads"),
        ("train.stop_at=-1", "train.stop_at"),
        ("data.max_image_pixels=0", "data.max_image_pixels must be > 0"),
    ],
)
def test_impossible_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        merge(TrainConfig(), parse_overrides([override]))


def test_optim_config_checks_values_built_in_python():
    for kwargs in ({"lr": float("inf")}, {"grad_clip": float("nan")}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError, match=f"optim.{next(iter(kwargs))}"):
            OptimConfig(**kwargs)
    assert OptimConfig(grad_clip=0.0, weight_decay=0.0).grad_clip == 0.0  # 0 disables


def test_duplicate_yaml_keys_are_an_error_naming_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.001\n  warmup_steps: 10\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*'lr' repeated.*lines 2 and 4"):
        load_yaml(path)
    path.write_text("optim:\n  lr: 0.001\noptim:\n  warmup_steps: 10\n")
    with pytest.raises(ConfigError, match="'optim' repeated"):
        load_yaml(path)
    path.write_text("base: &b {lr: 0.1}\noptim:\n  <<: *b\n  lr: 0.2\n")  # merge keys still work
    assert load_yaml(path)["optim"] == {"lr": 0.2}
    with pytest.raises(ConfigError, match="'text' repeated"):
        parse_overrides(["model.moe.experts={text: 2, text: 4}"])

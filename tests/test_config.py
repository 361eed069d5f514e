"""Config strictness: precedence, unknown keys, wrong types, presets and shipped YAML files."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from sparsefusion.config import ConfigError, from_dict, merge, parse_overrides, to_dict


@dataclass(kw_only=True)
class Inner:
    width: int = 4
    kind: Literal["a", "b"] = "a"
    names: list[str] = field(default_factory=lambda: ["x"])

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")


@dataclass(kw_only=True)
class Outer:
    seed: int = 0
    rate: float = 0.5
    inner: Inner = field(default_factory=Inner)


def test_overrides_parse_and_merge_nested():
    cfg = merge(Outer(), parse_overrides(["inner.width=8", "rate=3e-4", "inner.names=[a, b]"]))
    assert cfg.inner.width == 8 and cfg.rate == pytest.approx(3e-4)
    assert cfg.inner.names == ["a", "b"] and cfg.seed == 0


def test_int_accepted_for_float_but_not_str_for_int():
    assert merge(Outer(), {"rate": 1}).rate == 1.0
    with pytest.raises(ConfigError, match="inner.width: expected int"):
        merge(Outer(), {"inner": {"width": "wide"}})
    with pytest.raises(ConfigError, match="seed: expected int"):
        merge(Outer(), {"seed": True})


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.widht'.*'width'"):
        merge(Outer(), parse_overrides(["inner.widht=3"]))


def test_literal_and_post_init_errors_name_the_key():
    with pytest.raises(ConfigError, match="inner.kind"):
        merge(Outer(), {"inner": {"kind": "c"}})
    with pytest.raises(ConfigError, match="width must be >= 1"):
        merge(Outer(), {"inner": {"width": 0}})


def test_round_trip_through_dict():
    cfg = merge(Outer(), {"inner": {"width": 9}})
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.steps"])


def test_train_config_presets_and_precedence(tmp_path: Path):
    from sparsefusion.runs.presets import resolve_config

    cfg = resolve_config("dense", ["train.steps=7", "seed=3"])
    assert cfg.model.arch == "dense" and cfg.train.steps == 7 and cfg.seed == 3
    yml = tmp_path / "c.yaml"
    yml.write_text("preset: mot-debug\ntrain:\n  steps: 11\nmodel:\n  arch: dense\n")
    cfg = resolve_config(str(yml), ["train.steps=12"])
    assert cfg.model.arch == "dense" and cfg.train.steps == 12 and cfg.data.seq_len == 64
    with pytest.raises(ConfigError, match="train.stpes"):
        resolve_config("mot", ["train.stpes=10"])
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_config("nope", [])


def test_every_shipped_config_loads():
    from sparsefusion.runs.presets import PRESETS, resolve_config

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/ holds no YAML recipes"
    for path in files:
        resolve_config(str(path), [])
    for name in PRESETS:
        resolve_config(name, [])


def test_transfusion_presets_image_loss():
    """The CPU demo presets train flow matching (DDPM's noise prediction ignores the caption at
    that size); the debug twins and the paper-size presets keep the paper's DDPM."""
    from sparsefusion.runs.presets import PRESETS, resolve_config

    demo = {"tf-dense", "tf-mot", "tf-moe"}
    tf = [n for n in PRESETS if n.startswith("tf-")]
    assert demo < set(tf) and any(n.endswith("-163m") for n in tf)
    for name in tf:
        want = "flow" if name in demo else "ddpm"
        assert resolve_config(name, []).objective.image_loss == want, name
    for name in demo:  # 16 positions per image: a 16x16 latent (two VAE blocks) in 4x4 patches
        cfg = resolve_config(name, [])
        assert cfg.tokenizer.vae.channels == [16, 32] and cfg.model.patch_size == 4, name
    assert resolve_config("tf-mot", ["objective.image_loss=ddpm"]).objective.image_loss == "ddpm"


def test_every_preset_round_trips_through_its_resolved_yaml(tmp_path: Path):
    """`sparsefusion sweep` starts each run from its config as resolved and dumped at sweep
    start (sweep_config.yaml); that file must give back exactly the same config."""
    from sparsefusion.config import dump_yaml
    from sparsefusion.runs.presets import PRESETS, resolve_config

    for name in PRESETS:
        cfg = resolve_config(name, ["seed=3", "train.steps=7", f"run.dir={tmp_path / name}"])
        path = tmp_path / f"{name}.yaml"
        dump_yaml(cfg, path)
        assert resolve_config(str(path), []) == cfg, name

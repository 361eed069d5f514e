"""Hostile config input: huge integers, deep YAML, a repeated merge key; each a ConfigError
naming the key or file and line (issue 28 minor items)."""

from __future__ import annotations

import pytest

from sparsefusion.config import ConfigError, load_yaml, parse_overrides
from sparsefusion.runs.presets import resolve_config


def test_a_24_digit_seed_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="seed: 123456789012345678901234 is outside the 64-bit"):
        resolve_config("mot-debug", ["seed=123456789012345678901234"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 100000000000000000000000000\n")
    with pytest.raises(ConfigError, match="train.steps: .* is outside the 64-bit integer range"):
        resolve_config(str(path), [])


def test_deep_yaml_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: invalid YAML: nested too deeply"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_overrides(["model.x=" + "[" * 5000 + "]" * 5000])


def test_a_repeated_merge_key_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &a {x: 1}\nother: &b {y: 2}\nc:\n  <<: *a\n  <<: *b\n")
    match = r"merge key '<<' repeated in one mapping \(lines 4 and 5\)"
    with pytest.raises(ConfigError, match=match):
        load_yaml(path)
    path.write_text("base: &a {x: 1}\nother: &b {y: 2}\nc:\n  <<: [*a, *b]\n  x: 3\n")
    assert load_yaml(path)["c"] == {"x": 3, "y": 2}


def test_max_seq_len_below_seq_len_is_refused():
    with pytest.raises(ValueError, match="model.max_seq_len=16 is below data.seq_len=32"):
        resolve_config("mot-debug", ["model.max_seq_len=16", "data.seq_len=32"])
    cfg = resolve_config("mot-debug", ["model.max_seq_len=32", "data.seq_len=32"])
    assert cfg.model.max_seq_len == 32

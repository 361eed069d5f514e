"""The ``sparsefusion`` command: ``train``, ``config``, ``presets``, ``data``, ``tokenizer``.

The command line is the config: a preset name or a YAML file, then dotted ``key=value`` overrides
(precedence: dataclass defaults < preset < YAML file < overrides).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from sparsefusion.config import ConfigError, load_yaml, merge, parse_overrides, to_dict

DEFAULT_PRESET = "mot"


def resolve_config(config: str | None, overrides: list[str]):
    """Build the TrainConfig from a preset name or YAML path plus overrides.

    A YAML file may name a preset to start from with a top-level ``preset:`` key.
    """
    from sparsefusion.train.config import TrainConfig
    from sparsefusion.train.presets import preset

    layers: list[tuple[str, dict]] = []
    if config is None:
        config = DEFAULT_PRESET
    if config.endswith((".yaml", ".yml")) or Path(config).is_file():
        data = load_yaml(config)
        base = data.pop("preset", None)
        if base is not None:
            layers.append((f"preset {base}", _preset(preset, str(base))))
        layers.append((config, data))
    else:
        layers.append((f"preset {config}", _preset(preset, config)))
    layers.append(("command line", parse_overrides(overrides)))
    cfg = TrainConfig()
    for where, data in layers:
        try:
            cfg = merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
    return cfg


def _preset(lookup, name: str) -> dict:
    try:
        return lookup(name)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def cmd_train(args: argparse.Namespace) -> int:
    from sparsefusion.train.trainer import train

    config, overrides = _split_args(args.args)
    cfg = resolve_config(config, overrides)
    last = train(cfg)
    for split in ("train", "val"):
        if split in last:
            body = " ".join(f"{k}={v:.4f}" for k, v in last[split].items() if k.startswith("loss"))
            print(f"final {split}: {body}")
    print(f"run folder: {cfg.run.dir}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    config, overrides = _split_args(args.args)
    cfg = resolve_config(config, overrides)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from sparsefusion.train.presets import PRESETS

    for name in sorted(PRESETS):
        model = PRESETS[name].get("model", {})
        print(
            f"{name:16s} arch={model.get('arch')} dim={model.get('dim')} "
            f"layers={model.get('num_layers')}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsefusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    usage = "[CONFIG] [key=value ...]  (CONFIG: a preset name or a YAML file; default: mot)"
    for name, fn, text in (
        ("train", cmd_train, "train (or resume) a model"),
        ("config", cmd_config, "print the resolved config as YAML"),
    ):
        p = sub.add_parser(name, help=text, usage=f"sparsefusion {name} {usage}")
        p.add_argument("args", nargs="*")
        p.set_defaults(fn=fn)
    p = sub.add_parser("presets", help="list the built-in presets")
    p.set_defaults(fn=cmd_presets)
    from sparsefusion.cli.data_cmd import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # key=value overrides interleaved with options (data / tokenizer commands)
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

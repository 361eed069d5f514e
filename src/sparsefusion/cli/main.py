"""The ``sparsefusion`` command: ``train``, ``train-aux``, ``config``, ``presets``, ``export``,
``bench``, ``compare``, ``sweep``, ``eval``, ``data`` and ``tokenizer``.

The command line is the config: a preset name or a YAML file, then dotted ``key=value`` overrides
(precedence: dataclass defaults < preset < YAML file < overrides). Under
``torchrun --nproc_per_node N -m sparsefusion train ...`` every rank runs the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import yaml

from sparsefusion.config import ConfigError, merge, parse_overrides, to_dict
from sparsefusion.runs.presets import resolve_config


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def cmd_train(args: argparse.Namespace) -> int:
    from sparsefusion.distributed.mesh import print0
    from sparsefusion.train.trainer import train

    config, overrides = _split_args(args.args)
    cfg = resolve_config(config, overrides)
    hook = None
    if cfg.run.eval_generate_every:
        from sparsefusion.eval.run_eval import evaluate_at_checkpoint as hook
    last = train(cfg, on_checkpoint=hook)
    for split in ("train", "val"):
        if split in last:
            body = " ".join(f"{k}={v:.4f}" for k, v in last[split].items() if k.startswith("loss"))
            print0(f"final {split}: {body}")
    print0(f"run folder: {cfg.run.dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format != "safetensors":  # Hugging Face folders (the ``hf`` extra for hub)
        from sparsefusion.interop.export_run import export_run_hf, export_run_hub

        if args.format == "hf":
            out = export_run_hf(args.run_dir, args.out, args.tower)
        else:
            out = export_run_hub(args.run_dir, args.out)
        print(f"exported {args.run_dir} as a Hugging Face folder ({args.format}): {out}")
        return 0
    from sparsefusion.runs.export import export_run

    out = export_run(args.run_dir, args.out)
    print(f"exported {out / 'model.safetensors'} and {out / 'config.yaml'}")
    return 0


def cmd_train_aux(args: argparse.Namespace) -> int:
    from sparsefusion.train.aux_train import AuxTrainConfig, train_aux

    data = parse_overrides(args.overrides)
    unknown = sorted(set(data) - {"aux"})
    if unknown:
        raise ConfigError(f"train-aux takes only aux.* overrides, got {unknown}")
    cfg = merge(AuxTrainConfig(), data.get("aux", {}), where="aux")
    row = train_aux(args.run_dir, cfg)
    for key in sorted(row):
        if key.startswith(("batch/", "causal/", "gap/", "acc/mean", "selected/mean")):
            print(f"{key}={row[key]:.4f}")
    print(f"aux routers: {Path(args.run_dir) / 'aux_routers'}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    config, overrides = _split_args(args.args)
    cfg = resolve_config(config, overrides)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from sparsefusion.runs.presets import PRESETS

    for name in sorted(PRESETS):
        model = PRESETS[name].get("model", {})
        print(
            f"{name:16s} arch={model.get('arch')} dim={model.get('dim')} "
            f"layers={model.get('num_layers')}"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sparsefusion.bench.step import BenchSettings, run_bench

    settings = BenchSettings(
        archs=[a for a in args.archs.split(",") if a],
        size=args.size,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        rounds=args.rounds,
        host_malloc=args.host_malloc,
    )
    run_bench(settings, out=Path(args.out) if args.out else None)
    return 0


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time a training step of several architectures side by side")
    p.add_argument("--archs", default="dense,mot,naive-mot", help="comma-separated presets")
    p.add_argument("--size", default="tiny", help="model size (models/presets.py)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument(
        "--host-malloc",
        choices=["reuse", "system"],
        default="reuse",
        help="glibc allocator setting, as train.host_malloc (default: reuse, as training)",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="> 1: time the rows in turn, this many rounds"
    )
    p.add_argument("--out", default="", help="write the rows as JSON here")
    p.set_defaults(fn=cmd_bench)


def cmd_compare(args: argparse.Namespace) -> int:
    from sparsefusion.compare.report import markdown, run_compare
    from sparsefusion.compare.savings import CompareConfig
    from sparsefusion.config import merge

    runs = [a for a in args.runs if "=" not in a]
    if len(runs) < 2:
        raise ConfigError("compare needs a baseline run and at least one run to compare")
    cfg = merge(
        CompareConfig(), parse_overrides([a for a in args.runs if "=" in a]), where="compare"
    )
    out = Path(args.out) if args.out else Path(runs[0]).resolve().parent / "compare"
    comp, files = run_compare(runs[0], runs[1:], out, cfg)
    print(markdown(comp))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from sparsefusion.compare.sweep import load_sweep, run_sweep

    cfg = load_sweep(args.recipe)
    given = {"parallel": args.parallel, "threads": args.threads, "time_budget_s": args.time_budget}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    outcome = run_sweep(cfg, out=Path(args.out) if args.out else None, recipe=args.recipe)
    if outcome.report is not None:  # the report ends with the status of every run
        print(outcome.report.read_text())
        print(f"report: {outcome.report.parent}")
    else:
        for name, status in outcome.status.items():
            print(f"{name:20s} {status:10s} {outcome.reason[name]}")
    return 1 if "failed" in outcome.status.values() else 0


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
    p = sub.add_parser(
        "train-aux",
        help="train the auxiliary routers of a finished run (causal inference)",
        usage="sparsefusion train-aux RUN_DIR [aux.key=value ...]",
    )
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_train_aux)
    p = sub.add_parser("presets", help="list the built-in presets")
    p.set_defaults(fn=cmd_presets)
    _add_bench_parser(sub)
    p = sub.add_parser(
        "compare",
        help="FLOPs savings factor, step-matching slope and x%% checkpoint against a baseline",
        usage="sparsefusion compare BASELINE RUN [RUN ...] [--out DIR] [key=value ...]",
    )
    p.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files), baseline first")
    p.add_argument("--out", help="report folder (default: compare/ next to the baseline)")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("sweep", help="train the runs of a recipe, then compare them")
    p.add_argument("recipe", help="a sweep recipe YAML (see configs/sweeps/)")
    p.add_argument("--out", help="report folder (default: <sweep out>/compare)")
    p.add_argument("--parallel", type=int, help="runs trained at once (default: the recipe's)")
    p.add_argument("--threads", type=int, help="torch threads per run (0: cores / parallel)")
    p.add_argument(
        "--time-budget", type=float, metavar="SECONDS",
        help="stop the runs at a checkpoint after this long; run again to continue",
    )  # fmt: skip
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("export", help="newest checkpoint -> one safetensors file + config.yaml")
    p.add_argument("run_dir", help="the run folder")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/export[-FORMAT])")
    formats = ("safetensors", "hf", "hub")
    p.add_argument(
        "--format",
        choices=formats,
        default="safetensors",
        help="safetensors + config.yaml (default); hf: a transformers Llama/Qwen2 "
        "folder (dense run, or one tower); hub: save_pretrained folder, model card",
    )
    p.add_argument("--tower", default="", help="--format hf: tower to write (default: text's)")
    p.set_defaults(fn=cmd_export)
    from sparsefusion.cli.data_cmd import add_commands
    from sparsefusion.cli.eval_cmd import add_command as add_eval
    from sparsefusion.cli.generate_cmd import add_commands as add_generate_commands
    from sparsefusion.cli.serve_cmd import add_command as add_serve

    add_commands(sub)
    add_generate_commands(sub)
    add_eval(sub)
    add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from sparsefusion.checkpoint.store import CheckpointError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "compare":  # positionals after --out DIR
        args.runs += extra
    elif extra and hasattr(args, "overrides"):  # key=value overrides interleaved with options
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

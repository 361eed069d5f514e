"""``sparsefusion eval RUN_DIR [--checkpoint STEP] [eval.key=value ...]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsefusion.config import ConfigError, merge, parse_overrides


def cmd_eval(args: argparse.Namespace) -> int:
    from sparsefusion.eval.run_eval import EvalConfig, evaluate_run

    data = parse_overrides(args.overrides)
    unknown = sorted(set(data) - {"eval"})
    if unknown:
        raise ConfigError(f"eval takes only eval.* overrides, got {unknown}")
    cfg = merge(EvalConfig(), data.get("eval", {}), where="eval")
    _check_outputs(Path(args.run_dir))
    row, out = evaluate_run(args.run_dir, cfg, checkpoint=args.checkpoint)
    print((out / "summary.md").read_text())
    print(f"row appended to {args.run_dir}/eval.jsonl; samples and summary in {out}")
    return 0


def _check_outputs(run_dir: Path) -> None:
    """Refuse, before the evaluation runs, outputs that could not be written after it."""
    from sparsefusion.cli.generate_cmd import check_out_file, check_out_folder

    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a run folder")
    check_out_folder(run_dir / "eval", "the eval output folder")
    check_out_file(run_dir / "eval.jsonl", "the eval row file")
    for size in ("full", "small"):  # eval/step_<STEP>_<size>/: a file there blocks it
        for p in (run_dir / "eval").glob(f"step_*_{size}"):
            if not p.is_dir():
                raise ValueError(f"the eval output folder {p} is an existing file, not a folder")


def add_command(sub) -> None:
    """Register ``eval`` on the top-level subparsers."""
    p = sub.add_parser(
        "eval",
        help="perplexity (batch and causal routing), fid_sf, clip_sf and CIDEr of a run",
        usage="sparsefusion eval RUN_DIR [--checkpoint STEP] [eval.key=value ...]",
    )
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", type=int, default=None, help="step (default: the newest)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_eval)

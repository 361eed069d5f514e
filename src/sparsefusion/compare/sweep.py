"""``sparsefusion sweep RECIPE.yaml``: train configs on the same data and seed, then compare them.

A recipe (see ``configs/sweeps/``) names the runs, the overrides every run shares (size, steps,
seed: the same data and the same initialisation seed for all) and the baseline::

    out: runs/replication_cpu        # one run folder per entry, plus compare/
    baseline: dense
    overrides: [train.steps=1200]    # applied to every run, after its own config
    runs:
      - dense                        # a preset name or a YAML file; the folder is named after it
      - {name: mot-ffn, config: mot, overrides: [model.untie_attention=false]}

Finished runs (a checkpoint at their last step) are skipped; unfinished ones resume. A run whose
config cannot be resolved (for example a preset this version does not have) is reported and
skipped; a run that fails while training is reported and the sweep goes on. The comparison then
covers the baseline and every finished run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sparsefusion.compare.savings import CompareConfig
from sparsefusion.config import ConfigError, from_dict, load_yaml

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SweepRunConfig:
    """One run of a sweep.

    Attributes:
        name: the run folder's name under ``out`` (unique in the sweep).
        config: a preset name or a YAML file, as ``sparsefusion train`` takes.
        overrides: ``key=value`` overrides for this run, applied after the shared ones.
    """

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"sweep.runs: invalid run name {self.name!r}")


@dataclass(kw_only=True)
class SweepConfig:
    """A sweep recipe.

    Attributes:
        out: the sweep folder (``<out>/<run name>/`` per run, ``<out>/compare/`` for the report).
        baseline: the name of the run the others are compared with.
        seed: the seed of every run (model init and corpus).
        overrides: ``key=value`` overrides shared by every run (size, steps, data).
        runs: the runs, in training order (a plain string is a config used as its own name).
        compare: how the runs are compared.
    """

    out: str = "runs/sweep"
    baseline: str = "dense"
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    runs: list[SweepRunConfig]
    compare: CompareConfig = field(default_factory=CompareConfig)

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("sweep.runs must list at least one run")
        names = [r.name for r in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sweep.runs: duplicate run names {dup}; give each a 'name'")
        if self.baseline not in names:
            raise ValueError(f"sweep.baseline {self.baseline!r} is not one of the runs {names}")


def load_sweep(path: str | Path) -> SweepConfig:
    """Read a recipe strictly (unknown keys name the key); plain strings in ``runs`` expand."""
    data = load_yaml(path)
    runs = data.get("runs")
    if isinstance(runs, list):
        data["runs"] = [{"name": r, "config": r} if isinstance(r, str) else r for r in runs]
    try:
        return from_dict(SweepConfig, data, where="sweep")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


@dataclass
class SweepOutcome:
    """What happened to each run.

    Statuses: ``finished``, ``skipped`` (already done), ``unresolved`` (its config could not be
    built, e.g. an unknown preset), ``failed`` (an error while training).
    """

    status: dict[str, str] = field(default_factory=dict)
    reason: dict[str, str] = field(default_factory=dict)
    report: Path | None = None

    @property
    def done(self) -> list[str]:
        return [n for n, s in self.status.items() if s in ("finished", "skipped")]


def run_sweep(cfg: SweepConfig, *, out: Path | None = None, recipe: str = "") -> SweepOutcome:
    """Train every run (skipping finished ones), then compare the finished runs to the baseline."""
    from sparsefusion.compare.report import run_compare
    from sparsefusion.runs.presets import resolve_config

    root = Path(cfg.out)
    outcome = SweepOutcome()
    for run in cfg.runs:
        run_dir = root / run.name
        overrides = [f"seed={cfg.seed}", *cfg.overrides, *run.overrides, f"run.dir={run_dir}"]
        try:
            train_cfg = resolve_config(run.config, overrides)
        except (ConfigError, ValueError) as e:
            _record(outcome, run.name, "unresolved", str(e))
            continue
        if _finished(run_dir, train_cfg.train.steps):
            _record(outcome, run.name, "skipped", f"already finished in {run_dir}")
            continue
        _train(train_cfg, run.name, outcome)
    _write_status(root, outcome, recipe)
    if cfg.baseline not in outcome.done:
        raise ValueError(f"sweep: the baseline {cfg.baseline!r} did not finish; nothing compared")
    others = [n for n in outcome.done if n != cfg.baseline]
    if not others:
        log.warning("sweep: no run besides the baseline finished; nothing compared")
        return outcome
    comp, files = run_compare(
        root / cfg.baseline, [root / n for n in others], out or root / "compare", cfg.compare
    )
    _append_status(files[0], outcome, recipe)
    outcome.report = files[0]
    return outcome


def _train(train_cfg, name: str, outcome: SweepOutcome) -> None:
    from sparsefusion.train.trainer import train

    log.info("sweep: training %s in %s", name, train_cfg.run.dir)
    pkg_log = logging.getLogger("sparsefusion")
    handlers = list(pkg_log.handlers)
    try:
        train(train_cfg)
    except Exception as e:  # noqa: BLE001 - one failing run must not end the sweep
        log.exception("sweep: run %s failed", name)
        _record(outcome, name, "failed", f"{type(e).__name__}: {e}")
        return
    finally:  # the trainer's train.log handler must not catch the next run's log
        for handler in [h for h in pkg_log.handlers if h not in handlers]:
            pkg_log.removeHandler(handler)
            handler.close()
    _record(outcome, name, "finished", f"trained in {train_cfg.run.dir}")


def _record(outcome: SweepOutcome, name: str, status: str, reason: str) -> None:
    outcome.status[name], outcome.reason[name] = status, reason
    level = logging.WARNING if status in ("unresolved", "failed") else logging.INFO
    log.log(level, "sweep: %s %s: %s", name, status, reason)


def _finished(run_dir: Path, steps: int) -> bool:
    from sparsefusion.checkpoint.store import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return False
    return json.loads((ckpt / "state.json").read_text()).get("step", 0) >= steps


def _status_lines(outcome: SweepOutcome, recipe: str) -> list[str]:
    head = f"## Sweep runs ({recipe})" if recipe else "## Sweep runs"
    lines = [head, "", "| run | status | detail |", "| --- | --- | --- |"]
    for name, status in outcome.status.items():
        detail = outcome.reason[name].replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {status} | {detail} |")
    return lines + [""]


def _write_status(root: Path, outcome: SweepOutcome, recipe: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep_status.json").write_text(
        json.dumps({"recipe": recipe, "status": outcome.status, "reason": outcome.reason}, indent=2)
    )


def _append_status(md: Path, outcome: SweepOutcome, recipe: str) -> None:
    md.write_text(md.read_text() + "\n" + "\n".join(_status_lines(outcome, recipe)))

"""The run folders being served: what the run page and the playground read from them.

A run folder (``sparsefusion train``'s ``run.dir``) holds ``config.yaml``, ``metrics.jsonl``,
``checkpoints/step_*``, optionally ``eval.jsonl`` (``sparsefusion eval``; its sample grids,
captions and summaries under ``eval/step_<STEP>_<size>/``), other sample files under
``samples*/``, and compare reports (``compare*/compare.json`` inside the run folder or beside it,
as ``sparsefusion compare`` and ``sweep`` write them).

One damaged file never breaks the server: a half-written ``metrics.jsonl`` row (a crash
mid-write) is skipped and counted as the trainer skips it on resume, an unreadable config reads
as empty, non-finite numbers are sent as null, and the checkpoint served by default is the one
``sparsefusion generate`` would load (the newest valid one, chosen by the run layer).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparsefusion.checkpoint.resume import step_folders
from sparsefusion.runs.folder import METRICS_FILE, config_path, is_run_folder, run_config
from sparsefusion.serve.paths import inside

log = logging.getLogger(__name__)

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
SAMPLE_DIRS = ("eval", "samples")
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".wav", ".txt", ".md", ".jsonl")
MAX_SAMPLE_FILES = 200
CURVE_KEYS = re.compile(r"^loss(/[a-z_]+)?$")


@dataclass
class CompareReport:
    """One compare report that names the run: its folder and the plots it holds.

    Attributes:
        id: the report's index among the run's reports (used in URLs).
        folder: the report folder.
        plots: PNG file name -> path; the only files of the report that are served.
        summary: the report's ``compare.md`` text ("" when absent).
    """

    id: int
    folder: Path
    plots: dict[str, Path]
    summary: str


@dataclass
class RunInfo:
    """One served run folder.

    Attributes:
        name: the run's name in URLs and menus (the folder name, made unique).
        path: the resolved run folder.
    """

    name: str
    path: Path
    _picked: dict[tuple, int] = field(default_factory=dict, repr=False, compare=False)
    _pick_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def config(self) -> dict[str, Any]:
        """The run's resolved config (``config.yaml``; {} when it cannot be read)."""
        try:
            data = yaml.safe_load(config_path(self.path).read_text())
        except (OSError, ValueError, yaml.YAMLError, RecursionError) as e:
            log.warning("%s: cannot read %s (%s)", self.name, config_path(self.path), e)
            return {}
        return finite(data) if isinstance(data, dict) else {}

    def checkpoints(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        folders = step_folders(self.path)
        return sorted(int(p.name[5:]) for p in folders if (p / "state.json").is_file())

    def usable_checkpoint(self, step: int | None) -> int:
        """The step served: ``step`` once the run layer has validated it, or (None) the newest
        valid checkpoint, damaged newer ones skipped with a warning as ``generate`` does.

        The choice is kept until the checkpoint folders change.

        Raises:
            CheckpointError: the named checkpoint is damaged, or none is usable.
        """
        import torch

        from sparsefusion.checkpoint.weights import pick_checkpoint
        from sparsefusion.models.transformer import Transformer

        key = (step, *(_stamp(p) for p in step_folders(self.path)))
        with self._pick_lock:
            if key not in self._picked:
                with torch.device("meta"):  # shapes only: nothing is allocated
                    model = Transformer(run_config(self.path).model)
                folder = pick_checkpoint(self.path, model, step)
                self._picked[key] = int(folder.name[5:])
            return self._picked[key]

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` ([] when absent; malformed rows skipped)."""
        return self.read_rows(METRICS_FILE)[0]

    def read_rows(self, name: str) -> tuple[list[dict[str, Any]], int]:
        """The JSON-object rows of the run's JSONL file ``name`` and how many lines were skipped
        (a row cut short by a crash, anything that is not a JSON object)."""
        return read_rows(self.path / name)

    def curves(self) -> dict[str, dict[str, dict[str, list[float]]]]:
        """Loss curves: split (``train``/``val``) -> key (``loss``, ``loss/text`` ...) -> steps and
        values."""
        out: dict[str, dict[str, dict[str, list[float]]]] = {}
        for row in self.metrics():
            split = "val" if row.get("split") == "val" else "train"
            step = row.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                continue
            for key, value in _losses(row).items():
                curve = out.setdefault(split, {}).setdefault(key, {"step": [], "value": []})
                curve["step"].append(step)
                curve["value"].append(value)
        return out

    def eval_rows(self) -> list[dict[str, Any]]:
        """The rows ``sparsefusion eval`` appended to ``eval.jsonl`` ([] when absent)."""
        return finite(self.read_rows("eval.jsonl")[0])

    def sample_files(self) -> list[str]:
        """Sample files (images, audio, text) under ``eval*/`` and ``samples*/``, relative to the
        run folder, at most :data:`MAX_SAMPLE_FILES`."""
        found: list[str] = []
        for folder in sorted(self.path.iterdir()):
            if not folder.is_dir() or not folder.name.startswith(SAMPLE_DIRS):
                continue
            for f in sorted(folder.rglob("*")):
                if f.suffix.lower() in SAMPLE_SUFFIXES and f.is_file() and inside(self.path, f):
                    found.append(f.relative_to(self.path).as_posix())
                    if len(found) >= MAX_SAMPLE_FILES:
                        return found
        return found

    def reports(self) -> list[CompareReport]:
        """Compare reports naming this run (as baseline or compared run)."""
        return _find_reports(self.path)


def _find_reports(run: Path) -> list[CompareReport]:
    folders = [*sorted(run.glob("compare*")), *sorted(run.parent.glob("compare*"))]
    reports: list[CompareReport] = []
    for folder in folders:
        index = folder / "compare.json"
        if not index.is_file() or not _names_run(index, run):
            continue
        plots = {p.name: p.resolve() for p in sorted(folder.glob("*.png")) if _own_file(folder, p)}
        summary = ""
        if _own_file(folder, folder / "compare.md"):
            try:
                summary = (folder / "compare.md").read_text(errors="replace")
            except OSError:
                pass
        reports.append(CompareReport(len(reports), folder.resolve(), plots, summary))
    return reports


def _own_file(folder: Path, path: Path) -> bool:
    """A regular file of ``folder`` itself: not a symlink, not resolving outside it."""
    return not path.is_symlink() and path.is_file() and inside(folder, path)


def _stamp(folder: Path) -> tuple:
    """A checkpoint folder's name and its files' sizes and times (a change re-validates it)."""
    try:
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir())
    except OSError:
        files = []
    return (folder.name, *files)


def read_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON-object rows of a JSONL file ([] when absent) and the number of lines skipped:
    a half-written last row (a crash mid-write; the trainer drops it on resume) or any other
    line that is not a JSON object."""
    rows: list[dict[str, Any]] = []
    skipped = 0
    try:
        with Path(path).open("rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    row = None
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    skipped += 1
    except FileNotFoundError:
        return [], 0
    except OSError as e:
        log.warning("cannot read %s (%s)", path, e)
    if skipped:
        log.warning("%s: skipped %d malformed row(s)", path, skipped)
    return rows, skipped


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _names_run(index: Path, run: Path) -> bool:
    try:
        data = json.loads(index.read_text())
        paths = [data["baseline"]["path"], *(r["path"] for r in data.get("runs", []))]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    run = run.resolve()
    for p in paths:
        if not isinstance(p, str):
            continue
        path = Path(p)
        path = path.parent if path.name == "metrics.jsonl" else path  # compare stores the file
        # A relative path was relative to where compare ran: try the report's parent as well.
        candidates = [path] if path.is_absolute() else [path, index.parent.parent / path]
        if any(c.resolve() == run for c in candidates):
            return True
    return False


class RunCatalog:
    """The run folders given to ``sparsefusion serve``, by unique name.

    Args:
        run_dirs: run folders; each must exist and hold a ``config.yaml``.

    Raises:
        ValueError: a folder is missing or is not a run folder (naming it).
    """

    def __init__(self, run_dirs: list[str | Path]) -> None:
        if not run_dirs:
            raise ValueError("serve needs at least one run folder")
        self.runs: dict[str, RunInfo] = {}
        for d in run_dirs:
            path = Path(d).resolve()
            if not path.is_dir():
                raise ValueError(f"run folder {d} does not exist")
            if not is_run_folder(path):
                raise ValueError(f"{d} is not a run folder (no config.yaml)")
            name = self._unique(_NAME_CHARS.sub("-", path.name) or "run")
            self.runs[name] = RunInfo(name, path)

    def _unique(self, name: str) -> str:
        candidate, i = name, 2
        while candidate in self.runs:
            candidate, i = f"{name}-{i}", i + 1
        return candidate

    def get(self, name: str) -> RunInfo | None:
        """The run called ``name``, or None."""
        return self.runs.get(name)

    def __iter__(self):
        return iter(self.runs.values())


def summary(run: RunInfo) -> dict[str, Any]:
    """The short description of a run listed by ``GET /runs``."""
    rows, skipped = run.read_rows(METRICS_FILE)
    train_rows = [r for r in rows if r.get("split") != "val" and _is_step(r.get("step"))]
    val_rows = [r for r in rows if r.get("split") == "val"]
    cfg = run.config()
    model = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
    return {
        "name": run.name,
        "path": str(run.path),
        "arch": model.get("arch"),
        "checkpoints": run.checkpoints(),
        "last_step": train_rows[-1].get("step") if train_rows else None,
        "final_train": _losses(train_rows[-1]) if train_rows else {},
        "final_val": _losses(val_rows[-1]) if val_rows else {},
        "skipped_metrics_rows": skipped,
    }


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _losses(row: dict[str, Any]) -> dict[str, float | None]:
    """The finite loss values of a row (a NaN or infinite loss as None)."""
    return {
        k: finite(float(v))
        for k, v in row.items()
        if CURVE_KEYS.match(k) and isinstance(v, int | float) and not isinstance(v, bool)
    }

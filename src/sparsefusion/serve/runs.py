"""The run folders being served: what the run page and the playground read from them.

A run folder (``sparsefusion train``'s ``run.dir``) holds ``config.yaml``, ``metrics.jsonl``,
``checkpoints/step_*``, optionally ``eval.jsonl`` (``sparsefusion eval``; its sample grids,
captions and summaries under ``eval/step_<STEP>_<size>/``), other sample files under
``samples*/``, and compare reports (``compare*/compare.json`` inside the run folder or beside it,
as ``sparsefusion compare`` and ``sweep`` write them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sparsefusion.checkpoint.resume import step_folders
from sparsefusion.runs.folder import METRICS_FILE, config_path, is_run_folder, read_metrics
from sparsefusion.serve.paths import inside

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

    def config(self) -> dict[str, Any]:
        """The run's resolved config (``config.yaml``)."""
        data = yaml.safe_load(config_path(self.path).read_text())
        return data if isinstance(data, dict) else {}

    def checkpoints(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        folders = step_folders(self.path)
        return sorted(int(p.name[5:]) for p in folders if (p / "state.json").is_file())

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` ([] when absent)."""
        path = self.path / METRICS_FILE
        return read_metrics(path) if path.is_file() else []

    def curves(self) -> dict[str, dict[str, dict[str, list[float]]]]:
        """Loss curves: split (``train``/``val``) -> key (``loss``, ``loss/text`` ...) -> steps and
        values."""
        out: dict[str, dict[str, dict[str, list[float]]]] = {}
        for row in self.metrics():
            split = "val" if row.get("split") == "val" else "train"
            for key, value in row.items():
                if CURVE_KEYS.match(key) and isinstance(value, int | float) and "step" in row:
                    curve = out.setdefault(split, {}).setdefault(key, {"step": [], "value": []})
                    curve["step"].append(row["step"])
                    curve["value"].append(float(value))
        return out

    def eval_rows(self) -> list[dict[str, Any]]:
        """The rows ``sparsefusion eval`` appended to ``eval.jsonl`` ([] when absent)."""
        path = self.path / "eval.jsonl"
        return read_metrics(path) if path.is_file() else []

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
        plots = {p.name: p.resolve() for p in sorted(folder.glob("*.png")) if p.is_file()}
        summary = (folder / "compare.md").read_text() if (folder / "compare.md").is_file() else ""
        reports.append(CompareReport(len(reports), folder.resolve(), plots, summary))
    return reports


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
    rows = run.metrics()
    train_rows = [r for r in rows if r.get("split") != "val"]
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
    }


def _losses(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if CURVE_KEYS.match(k) and isinstance(v, int | float)}

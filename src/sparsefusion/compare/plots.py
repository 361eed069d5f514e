"""PNG plots of a comparison (matplotlib, Agg backend: no display needed).

- loss against cumulative FLOPs (or wall-clock training time), one panel per key, every run
  (smoothed; raw points faint), with the baseline's final value as a dashed line;
- step matching, one panel per key: for each baseline step (or second of training), the run step
  (second) reaching the same value, the fitted line ``t_s = s * t_d`` and the diagonal (the
  baseline itself; MoT's Figure 19 when on time).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

if TYPE_CHECKING:
    from sparsefusion.compare.report import Comparison

_TITLES = {"train": "training", "val": "validation", "eval": "eval"}


def _panels(num: int, per_row: int = 4):
    """``num`` panels, at most ``per_row`` to a row (per-source keys make a dozen); the unused
    ones of the last row are hidden."""
    cols, rows = min(num, per_row), -(-num // per_row)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[num:]:
        ax.set_visible(False)
    return fig, flat[:num]


def _label(key: str) -> str:
    return "overall" if key == "loss" else key.removeprefix("loss/")


def plot_loss_vs_flops(comp: Comparison, split: str, path: Path, *, time: bool = False) -> Path:
    """Loss against FLOPs (``time``: against elapsed seconds) per key, baseline and every run."""
    base_keys = comp.smoothed[comp.baseline.name][split]
    fig, axes = _panels(len(base_keys))
    names = [comp.baseline.name] + [r.run.name for r in comp.runs]
    runs = [comp.baseline] + [r.run for r in comp.runs]
    for ax, key in zip(axes, base_keys, strict=True):
        for i, (name, run) in enumerate(zip(names, runs, strict=True)):
            curve = comp.smoothed[name].get(split, {}).get(key)
            if curve is None:
                continue
            color = f"C{i}"
            _, raw_flops_M, raw_y_M = run.splits[split].curve(key)
            raw_x_M = run.splits[split].elapsed_of(key) if time else raw_flops_M
            ax.plot(raw_x_M, raw_y_M, color=color, alpha=0.2, linewidth=0.8)
            style = "--" if i == 0 else "-"
            x_M = curve[3] if time else curve[1]
            ax.plot(x_M, curve[2], style, color=color, label=name, linewidth=1.4)
        ax.axhline(float(base_keys[key][2][-1]), color="gray", linestyle=":", linewidth=0.8)
        if not time:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
        ax.set_xlabel("training seconds" if time else "training FLOPs")
        ax.set_ylabel(_label(key) if split == "eval" else f"{_label(key)} loss")
        ax.set_title(f"{_label(key)} ({_TITLES[split]})")
        if split != "eval":
            _zoom_y(ax, base_keys[key][2])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _zoom_y(ax, base_y_N: np.ndarray) -> None:
    """Keep the interesting range: from below the best loss to the baseline's loss at 10%."""
    lo, hi = ax.get_ylim()
    top = float(base_y_N[min(len(base_y_N) - 1, max(1, len(base_y_N) // 10))])
    if top > lo:
        ax.set_ylim(lo, min(hi, top + 0.1 * (top - lo)))


def _relation(kind: str) -> str:
    return "= " if kind == "exact" else ""  # bounds already print "<" or ">"


def plot_step_matching(comp: Comparison, split: str, path: Path, *, time: bool = False) -> Path:
    """Matched run steps (``time``: seconds) against the baseline's per key, with fitted slopes."""
    base_keys = comp.smoothed[comp.baseline.name][split]
    fig, axes = _panels(len(base_keys))
    unit = "seconds" if time else "step"
    for ax, key in zip(axes, base_keys, strict=True):
        last = float(base_keys[key][3 if time else 0][-1])
        if not np.isfinite(last) or last <= 0:
            last = 1.0
        ax.plot([0, last], [0, last], ":", color="gray", linewidth=0.8, label=comp.baseline.name)
        for i, r in enumerate(comp.runs, start=1):
            kr = r.keys.get(split, {}).get(key)
            m = None if kr is None else (kr.time_match if time else kr.match)
            if m is None:
                continue
            ok_N = np.isfinite(m.run_step)
            ax.plot(m.base_step[ok_N], m.run_step[ok_N], ".", color=f"C{i}", markersize=3)
            if m.slope.value is not None:
                ax.plot(
                    [0, last],
                    [0, m.slope.value * last],
                    color=f"C{i}",
                    linewidth=1.2,
                    linestyle="-" if m.slope.kind == "exact" else "--",
                    label=f"{r.run.name} s {_relation(m.slope.kind)}{m.slope.text(2)}",
                )
        ax.axvline(comp.cfg.fit_from * last, color="gray", linewidth=0.5, alpha=0.5)
        ax.set_xlabel(f"{comp.baseline.name} {unit}")
        ax.set_ylabel(f"run {unit} reaching the same value")
        ax.set_title(f"{_label(key)} ({_TITLES[split]})")
        ax.set_xlim(0, last)
        ax.set_ylim(0, last * 1.05)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

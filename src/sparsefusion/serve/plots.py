"""The run page's loss plot: one panel per loss key (overall, then each modality), training and
validation curves, as PNG bytes (matplotlib's object API with the Agg canvas, so no global pyplot
state is shared between server threads)."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Curves = dict[str, dict[str, dict[str, list[float]]]]


MAX_PANELS = 12  # a metrics file with hundreds of loss keys still plots in bounded time


def _keys(curves: Curves) -> list[str]:
    keys = {k for split in curves.values() for k in split}
    return sorted(keys, key=lambda k: (k != "loss", k))


def loss_plot_png(curves: Curves, title: str) -> bytes:
    """Loss curves as a PNG.

    Args:
        curves: split -> key -> ``{"step": [...], "value": [...]}`` (``RunInfo.curves``).
        title: the figure title (the run name).

    Returns:
        PNG bytes; a run without metrics gets a single panel saying so.
    """
    keys = _keys(curves)[:MAX_PANELS] or ["loss"]
    fig = Figure(figsize=(3.6 * len(keys), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        train, val = curves.get("train", {}).get(key), curves.get("val", {}).get(key)
        if train:
            ax.plot(train["step"], train["value"], color="C0", linewidth=1.2, label="train")
        if val:
            ax.plot(val["step"], val["value"], "o-", color="C1", markersize=3, label="validation")
        if not train and not val:
            ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("overall" if key == "loss" else key.removeprefix("loss/"))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

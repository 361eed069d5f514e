"""Named model sizes: dicts of :class:`ModelConfig` field overrides.

Shapes follow the papers' tables: MoT Chameleon sizes (arXiv 2411.04996 Table 1; the name is the
activated parameter count with V = 65,536) and the MoMa 90M dense base (arXiv 2407.21770 Table 1).
MoT sizes use the reference repository's FFN rounding (``multiple_of`` 256); ``moma-90m`` keeps
its FFN close to 8d/3 = 1365 (rounded to 1368, a multiple of 8 so grouped matmuls stay usable).
Architecture choices (arch, towers, untie flags) are left to the recipe.
"""

from __future__ import annotations

import copy
from typing import Any

from sparsefusion.models.transformer import ModelConfig

MODEL_SIZES: dict[str, dict[str, Any]] = {
    # CPU sizes: tests and demos.
    "debug": {"dim": 32, "num_layers": 2, "num_heads": 4},
    "tiny": {"dim": 128, "num_layers": 4, "num_heads": 4},
    # MoT Chameleon sizes.
    "small": {"dim": 256, "num_layers": 4, "num_heads": 8, "multiple_of": 256},
    "94m": {"dim": 512, "num_layers": 8, "num_heads": 8, "multiple_of": 256},
    "443m": {"dim": 1024, "num_layers": 24, "num_heads": 16, "multiple_of": 256},
    "880m": {"dim": 1536, "num_layers": 24, "num_heads": 24, "multiple_of": 256},
    "1.5b": {"dim": 2048, "num_layers": 24, "num_heads": 16, "multiple_of": 256},
    "7b": {"dim": 4096, "num_layers": 32, "num_heads": 32, "multiple_of": 256},
    # MoMa dense base of the 90M FLOPs-matched family (l=8, d=512, h=8, ffn 4d before the shrink).
    "moma-90m": {"dim": 512, "num_layers": 8, "num_heads": 8, "multiple_of": 8},
    # The throughput reference of the benchmark targets (docs/benchmarks.md): 537M non-embedding
    # parameters, width 2048, 8 layers, FFN 4d (the issue quotes 545M for this shape).
    "bench-545m": {"dim": 2048, "num_layers": 8, "num_heads": 16, "ffn_hidden": 8192},
}


def model_size(name: str) -> dict[str, Any]:
    """Field overrides of a named size.

    Args:
        name: one of ``MODEL_SIZES``.

    Returns:
        A fresh dict of ModelConfig field values (safe to modify).

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model size {name!r}; valid: {', '.join(MODEL_SIZES)}")
    return copy.deepcopy(MODEL_SIZES[name])


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """A ModelConfig of a named size with further field overrides (e.g. ``vocab_size``).

    Args:
        name: one of ``MODEL_SIZES``.
        **overrides: ModelConfig fields that win over the preset.

    Returns:
        The validated config.
    """
    return ModelConfig(**{**model_size(name), **overrides})

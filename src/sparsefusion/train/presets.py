"""Named training recipes: ``sparsefusion train NAME``.

A preset is a mapping of overrides on top of the dataclass defaults, applied before the YAML file
and the command-line overrides. ``mot`` and ``dense`` are the CPU demo (a few minutes on 2 cores);
``<arch>-<size>`` presets use the papers' shapes (spec section 5.5) and need a GPU.
"""

from __future__ import annotations

from typing import Any

from sparsefusion.models.presets import MODEL_SIZES, model_size

_DEMO: dict[str, Any] = {
    "model": {"size": "tiny"},
    "data": {"seq_len": 512, "batch_size": 8},
    "optim": {"lr": 3e-3, "warmup_steps": 100},
    "train": {"steps": 1200},
    "run": {"log_every": 10, "eval_every": 200, "save_every": 200},
}

_DEBUG: dict[str, Any] = {
    "model": {"size": "debug"},
    "data": {"seq_len": 64, "batch_size": 4, "val_batches": 2},
    "tokenizer": {
        "text_vocab_size": 384,
        "text_train_docs": 300,
        "image_train_images": 256,
        "image": {"codebook_size": 64, "train_steps": 60, "batch_size": 32, "hidden": 32},
    },
    "optim": {"lr": 3e-3, "warmup_steps": 5},
    "train": {"steps": 20},
    "run": {"log_every": 5, "eval_every": 10, "save_every": 10, "tensorboard": False},
}

_GPU: dict[str, Any] = {
    "data": {"seq_len": 4096, "batch_size": 4},
    "optim": {"lr": 3e-4, "warmup_steps": 2000, "schedule": "linear", "min_lr_ratio": 0.01},
    "train": {"steps": 100000},
    "run": {"log_every": 50, "eval_every": 2000, "save_every": 1000},
}


def _with_arch(base: dict[str, Any], arch: str, size: str | None = None) -> dict[str, Any]:
    """Copy ``base``, set the architecture and inline the named model size's fields."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    model = dict(out.get("model", {}))
    size = size or model.pop("size")
    model.pop("size", None)
    out["model"] = dict(model_size(size), **model, arch=arch)
    return out


def _build_registry() -> dict[str, dict[str, Any]]:
    reg: dict[str, dict[str, Any]] = {}
    for arch in ("mot", "dense"):
        reg[arch] = _with_arch(_DEMO, arch)
        reg[f"{arch}-debug"] = _with_arch(_DEBUG, arch)
        for size in MODEL_SIZES:
            if size in ("debug", "tiny"):
                continue
            reg[f"{arch}-{size}"] = _with_arch(_GPU, arch, size)
    return reg


PRESETS: dict[str, dict[str, Any]] = _build_registry()


def preset(name: str) -> dict[str, Any]:
    """The override mapping of a named preset (ValueError listing valid names otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]

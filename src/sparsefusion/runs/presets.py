"""Named training recipes: ``sparsefusion train NAME``.

A preset is a mapping of overrides on top of the dataclass defaults, applied before the YAML file
and the command-line overrides. ``mot`` and ``dense`` are the CPU demo (a few minutes on 2 cores);
``<arch>-<size>`` presets use the papers' shapes (spec section 5.5) and need a GPU.

Sparse recipes (MoMa arXiv 2407.21770, MoT section 5.9) at the demo size, each FLOPs-matched to
``dense`` of the same size (same active compute per token): ``moe-8x`` (8 mixed expert-choice
experts, capacity 1 = one expert per token on average), ``moma-1t1i``, ``moma-4t4i``,
``mot-text-moe4`` (MoT whose text FFN is a 4-expert group), and ``mod`` / ``moma-4t4i-mod``
(MoD every other layer from layer 0 at 25%, which restores the compute by adding layers: the
4-layer demo becomes 7 layers = 3 full + 4 quarter layers; the 2-layer debug size becomes 4;
at the demo size the capacity is then nudged to about 0.26 so that compute including attention
matches dense, see ``_matched_capacity``).
Each has a ``<name>-debug`` twin for tests.

Transfusion recipes (arXiv 2408.11039; MoT section 5.4 (c)): ``tf-dense`` and ``tf-mot`` train
text next-token prediction plus image diffusion on continuous latents of a VAE the project trains
(``objective.name=transfusion``, which sets ``tokenizer.image_kind=vae``; diffusers needed), with
the Transfusion paper's Llama-style block: pre-norm and no QK-norm (both switchable:
``model.norm_placement=post model.qk_norm=true``) and no z-loss. At the demo size the 32-pixel
images become 16x16x4 latents in 4x4 patches (a two-block VAE, ``tokenizer.vae.channels=[16,32]``,
``model.patch_size=4``): 16 positions per image. The three-block VAE's 8x8x4 latent (2x2
patches, the debug twins' shape) turned every shape into a blob (round trip fid_sf 224 /
clip_sf 57 against 104 / 88; docs/results/transfusion_cpu/README.md). ``tf-<arch>-debug`` twins
exist for every architecture (dense, mot, moe, moma, mod, hybrid); ``tf-moe`` (4 experts,
expert choice, capacity 1) is the MoT paper's third Transfusion row at the demo size;
``tf-dense-<size>`` and ``tf-mot-<size>`` use the MoT paper's Transfusion shapes (163m, 760m,
1.4b, 7b; spec section 5.5) with the Transfusion optimizer (lr 3e-4, 4000 warm-up steps, cosine
to 1.5e-5) and a 256-pixel, 8x-downsampling, 8-channel VAE (a 32x32x8 latent: 256 patches of
2x2), and need a GPU.

Image loss: the paper-size presets train the paper's DDPM noise prediction; the CPU demo presets
(``tf-dense``, ``tf-mot``, ``tf-moe``) train flow matching (``objective.image_loss=flow``),
because at the demo size noise prediction does not learn to use the caption where an image's
layout is decided (at high noise its loss hardly depends on the caption; measured with
``benchmarks/caption_use.py``, docs/results/transfusion_cpu/README.md) and its samples ignore
their captions. ``objective.image_loss=ddpm`` gives the paper's loss at the demo size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsefusion.config import ConfigError, from_dict, load_yaml, merge, parse_overrides
from sparsefusion.models.flops import mod_matched_capacity
from sparsefusion.models.presets import MODEL_SIZES, model_size
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.nn.mod import MoDConfig, matched_num_layers

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


_MOD = {"enabled": True, "interval": 2, "first_layer": 0, "capacity": 0.25}

# name -> (arch, model overrides); "mod" marks recipes that add layers to match FLOPs.
_SPARSE: dict[str, tuple[str, dict[str, Any]]] = {
    "moe-8x": ("moe", {"moe": {"num_experts": 8, "capacity": 1.0}}),
    "moma-1t1i": ("moma", {"moe": {"experts": {"text": 1, "image": 1}}}),
    "moma-4t4i": ("moma", {"moe": {"experts": {"text": 4, "image": 4}, "capacity": 1.0}}),
    "mot-text-moe4": ("mot", {"moe": {"experts": {"text": 4}, "capacity": 1.0}}),
    "mod": ("dense", {"mod": _MOD}),
    "moma-4t4i-mod": ("moma", {"moe": {"experts": {"text": 4, "image": 4}}, "mod": _MOD}),
}


# Mean document length of the built-in scenes corpus at the demo tokenizer (measured: captions,
# 64-code images with their sentinels, text-only and interleaved pages), for FLOPs matching.
_SCENES_DOC_TOKENS = 90


def _sparse(base: dict[str, Any], arch: str, extra: dict[str, Any]) -> dict[str, Any]:
    out = _with_arch(base, arch)
    out["model"].update(extra)
    if "mod" in extra:
        layers = out["model"]["num_layers"]
        out["model"]["num_layers"] = matched_num_layers(layers, MoDConfig(**extra["mod"]))
        out["model"]["mod"] = {**extra["mod"], "capacity": _matched_capacity(base, out)}
    return out


def _matched_capacity(base: dict[str, Any], sparse: dict[str, Any]) -> float:
    """MoMa's depth rule, then the capacity that matches dense compute with attention counted.

    At the demo shape the depth rule alone lands 0.5-3% below dense once attention is counted
    (a routed layer keeps about capacity^2 of the attention pairs); the capacity is nudged from
    0.25 so that the expected FLOPs per token equal dense's for the built-in corpus. Where the
    depth rule overshoots (the 2-layer debug size), the capacity stays as given.
    """
    dense = from_dict(ModelConfig, _with_arch(base, "dense")["model"])
    mod = from_dict(ModelConfig, sparse["model"])
    seq_len = base["data"]["seq_len"]
    doc_len = min(seq_len, _SCENES_DOC_TOKENS)
    share = [1.0 / mod.num_towers] * mod.num_towers
    return mod_matched_capacity(dense, mod, seq_len=seq_len, doc_len=doc_len, tower_share=share)


_TF: dict[str, Any] = {
    "objective": {"name": "transfusion", "z_loss": 0.0},  # tokenizer.image_kind follows: vae
    "model": {"norm_placement": "pre", "qk_norm": False},
}
_TF_DEBUG_VAE = {"train_steps": 30, "batch_size": 8, "channels": [8, 16, 16], "held_out": 16}
_TF_GPU_VAE = {"image_size": 256, "latent_channels": 8, "channels": [64, 128, 256, 256]}
_TF_GPU_OPTIM = {
    "lr": 3e-4,
    "warmup_steps": 4000,
    "schedule": "cosine",
    "min_lr_ratio": 0.05,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
}
# MoT paper, Transfusion setting (spec section 5.5): name -> (dim, layers, heads).
TF_SIZES = {
    "163m": (768, 16, 12),
    "760m": (1536, 24, 24),
    "1.4b": (2048, 24, 16),
    "7b": (4096, 32, 32),
}
# Architectures of the tf-<arch>-debug twins: name -> (arch, model overrides).
_TF_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense", {}),
    "mot": ("mot", {}),
    "moe": ("moe", {"moe": {"num_experts": 4, "capacity": 1.0}}),
    "moma": ("moma", {"moe": {"experts": {"text": 2, "image": 2}, "capacity": 1.0}}),
    "mod": ("dense", {"mod": _MOD}),
    "hybrid": ("mot", {"moe": {"experts": {"text": 2}, "capacity": 1.0}}),
}


def _transfusion(
    base: dict[str, Any], arch: str, extra: dict[str, Any], size: str | None = None
) -> dict[str, Any]:
    out = _with_arch(base, arch, size) if size else _sparse(base, arch, extra)
    for section, values in _TF.items():
        out[section] = {**out.get(section, {}), **values}
    return out


def _tf_demo(arch: str, extra: dict[str, Any]) -> dict[str, Any]:
    """A CPU demo Transfusion preset: flow matching (see the module doc for why not DDPM) on a
    16x16x4 latent in 4x4 patches (16 positions per image, as 8x8x4 in 2x2 patches, but a VAE
    round trip that keeps the shapes)."""
    out = _transfusion(_DEMO, arch, extra)
    out["objective"] = {**out["objective"], "image_loss": "flow"}
    out["tokenizer"] = {**out.get("tokenizer", {}), "vae": {"channels": [16, 32]}}
    out["model"] = {**out["model"], "patch_size": 4}
    return out


def _tf_registry() -> dict[str, dict[str, Any]]:
    reg: dict[str, dict[str, Any]] = {}
    for name, (arch, extra) in _TF_ARCHS.items():
        debug = _transfusion(_DEBUG, arch, extra)
        debug["tokenizer"] = {**debug["tokenizer"], "vae": dict(_TF_DEBUG_VAE)}
        debug["data"] = {**debug["data"], "seq_len": 64}
        reg[f"tf-{name}-debug"] = debug
        if name == "moe":  # the MoT paper's third Transfusion row (MoE-4x), demo size only
            reg["tf-moe"] = _tf_demo(arch, extra)
        if name in ("dense", "mot"):
            reg[f"tf-{name}"] = _tf_demo(arch, extra)
            for size, (dim, layers, heads) in TF_SIZES.items():
                gpu = _transfusion(_GPU, arch, extra, size="small")
                gpu["model"].update(dim=dim, num_layers=layers, num_heads=heads, multiple_of=256)
                gpu["tokenizer"] = {**gpu.get("tokenizer", {}), "vae": dict(_TF_GPU_VAE)}
                gpu["data"] = {**gpu["data"], "image_size": 256}
                gpu["optim"] = dict(_TF_GPU_OPTIM)
                reg[f"tf-{name}-{size}"] = gpu
    return reg


def _build_registry() -> dict[str, dict[str, Any]]:
    reg: dict[str, dict[str, Any]] = {}
    for arch in ("mot", "dense"):
        reg[arch] = _with_arch(_DEMO, arch)
        reg[f"{arch}-debug"] = _with_arch(_DEBUG, arch)
        for size in MODEL_SIZES:
            if size in ("debug", "tiny"):
                continue
            reg[f"{arch}-{size}"] = _with_arch(_GPU, arch, size)
    for name, (arch, extra) in _SPARSE.items():
        reg[name] = _sparse(_DEMO, arch, extra)
        reg[f"{name}-debug"] = _sparse(_DEBUG, arch, extra)
    reg.update(_tf_registry())
    return reg


PRESETS: dict[str, dict[str, Any]] = _build_registry()


def preset(name: str) -> dict[str, Any]:
    """The override mapping of a named preset (ValueError listing valid names otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


DEFAULT_PRESET = "mot"


def resolve_config(config: str | None, overrides: list[str]):
    """Build the TrainConfig from a preset name or YAML path plus dotted overrides.

    Precedence: dataclass defaults < preset < YAML file < overrides. A YAML file may name a
    preset to start from with a top-level ``preset:`` key. ``tokenizer.image_kind`` follows
    ``objective.name`` until a layer states it (then the two must agree).
    """
    from sparsefusion.runs.config import TrainConfig

    layers: list[tuple[str, dict]] = []
    if config is None:
        config = DEFAULT_PRESET
    if config.endswith((".yaml", ".yml")) or Path(config).is_file():
        data = load_yaml(config)
        base = data.pop("preset", None)
        if base is not None:
            layers.append((f"preset {base}", _preset(str(base))))
        layers.append((config, data))
    else:
        layers.append((f"preset {config}", _preset(config)))
    layers.append(("command line", parse_overrides(overrides)))
    cfg = TrainConfig()
    stated = False  # whether a layer has stated tokenizer.image_kind
    for where, data in layers:
        stated = stated or _states_image_kind(data)
        if not stated:  # re-derive it from this layer's objective.name
            tokenizer = data.get("tokenizer", {})
            data = {**data, "tokenizer": {**tokenizer, "image_kind": "auto"}}
        try:
            cfg = merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
    return cfg


def _states_image_kind(data: dict) -> bool:
    tokenizer = data.get("tokenizer", {})
    return not isinstance(tokenizer, dict) or "image_kind" in tokenizer  # (a bad value: merge says)


def _preset(name: str) -> dict:
    try:
        return preset(name)
    except ValueError as e:
        raise ConfigError(str(e)) from e

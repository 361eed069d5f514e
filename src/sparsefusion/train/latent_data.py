"""How the trainer sets up the Transfusion setting (continuous image latents).

A run is in the Transfusion setting when ``objective.name`` is ``transfusion``; it then needs the
VAE tokenizer (``tokenizer.image_kind=vae``), ``model.latent_channels`` is taken from the VAE,
and its data streams are the latent loaders of ``data/latent_packing.py``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from sparsefusion.checkpoint.store import latest_checkpoint
from sparsefusion.config import load_yaml
from sparsefusion.data.latent_packing import LatentShardedLoaders, latent_validation_batches
from sparsefusion.runs.config import TrainConfig


def is_latent(cfg: TrainConfig) -> bool:
    """Whether the run trains on continuous image latents (the Transfusion objective)."""
    latent = cfg.objective.name == "transfusion"
    if latent != (cfg.tokenizer.image_kind == "vae"):
        raise ValueError(
            "objective.name=transfusion and tokenizer.image_kind=vae go together; got "
            f"objective.name={cfg.objective.name!r}, tokenizer.image_kind="
            f"{cfg.tokenizer.image_kind!r}"
        )
    return latent


def finalize_latent(cfg: TrainConfig, tokenizer: Any) -> TrainConfig:
    """Set ``model.latent_channels`` from the VAE and check the patch size fits its grid."""
    channels = tokenizer.latent_shape[0]
    if cfg.model.latent_channels not in (0, channels):
        raise ValueError(
            f"model.latent_channels={cfg.model.latent_channels} but the VAE has {channels}"
        )
    tokenizer.patches_per_image(cfg.model.patch_size)  # raises naming model.patch_size
    return replace(cfg, model=replace(cfg.model, latent_channels=channels))


def check_latent_resume(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a Transfusion run with another VAE or patch size (a clear message)."""
    path = run_dir / "config.yaml"
    if not path.exists() or latest_checkpoint(run_dir) is None:
        return
    old = load_yaml(path)
    old_vae = old.get("tokenizer", {}).get("vae")
    old_k = old.get("model", {}).get("patch_size")
    new_vae = {k: getattr(cfg.tokenizer.vae, k) for k in (old_vae or {})}
    if old_vae is not None and old_vae != new_vae:
        raise ValueError(
            f"{path}: this run was trained with another VAE (tokenizer.vae {old_vae} != "
            f"{new_vae}); its latents would mean something else. Use another run.dir"
        )
    if old_k is not None and old_k != cfg.model.patch_size:
        raise ValueError(
            f"{path}: this run was trained with model.patch_size={old_k}, not "
            f"{cfg.model.patch_size}; use another run.dir or the same patch size"
        )


def _kwargs(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "seq_len": cfg.data.seq_len,
        "batch_size": cfg.data.batch_size,
        "patch_size": cfg.model.patch_size,
        "seed": cfg.seed,
        "caption_first": cfg.objective.caption_first,
        "caption_dropout": cfg.objective.caption_dropout,
        "strict": cfg.data.strict,
        "max_doc_tokens": cfg.data.max_doc_tokens,
    }


def latent_loaders(cfg: TrainConfig, source: Any, tokenizer: Any, rank: int, world_size: int):
    """The training streams of one rank."""
    return LatentShardedLoaders(
        source,
        tokenizer,
        rank=rank,
        world_size=world_size,
        grad_accum=cfg.train.grad_accum,
        **_kwargs(cfg),
    )


def latent_val_batches(cfg: TrainConfig, source: Any, tokenizer: Any, num_batches: int = 0) -> list:
    """Fixed validation batches (fixed timestep grid and noise seed per batch; 0 batches: the
    run's ``data.val_batches``)."""
    return latent_validation_batches(
        source,
        tokenizer,
        num_batches=num_batches or cfg.data.val_batches,
        noise_seed=cfg.objective.val_noise_seed,
        **_kwargs(cfg),
    )

"""Read a Hugging Face ``config.json`` (Llama, Qwen2, Mistral) into sparsefusion model settings.

Both spellings of the RoPE settings are accepted: ``rope_theta`` + ``rope_scaling`` (the files of
the published checkpoints) and ``rope_parameters`` (what transformers >= 5 writes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}


class HFImportError(ValueError):
    """A Hugging Face folder cannot be imported; the message names the file and key."""


@dataclass(frozen=True)
class HFModelSpec:
    """The architecture of a Hugging Face causal LM, as sparsefusion needs it.

    Attributes:
        family: "llama", "qwen2" or "mistral".
        vocab_size: rows of the embedding table.
        dim: hidden size.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads.
        ffn_hidden: SwiGLU intermediate size.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: ``model.rope_scaling`` fields (kind "none" or "llama3").
        qkv_bias: bias on Q/K/V (Qwen2).
        tie_embeddings: the head reuses the embedding table.
        max_seq_len: max_position_embeddings (Mistral: at most its sliding window, below which
            sliding-window attention is plain causal attention).
        bos_token_id: the LLM's BOS id (None when it has none).
        eos_token_id: the LLM's first EOS id (None when it has none).
    """

    family: str
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any]
    qkv_bias: bool
    tie_embeddings: bool
    max_seq_len: int
    bos_token_id: int | None
    eos_token_id: int | None

    def model_fields(self) -> dict[str, Any]:
        """The ``model.*`` settings that make a sparsefusion decoder this LLM's graph."""
        return {
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "ffn_hidden": self.ffn_hidden,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling),
            "qkv_bias": self.qkv_bias,
            "tie_embeddings": self.tie_embeddings,
            "qk_norm": False,
            "norm_placement": "pre",
            "max_seq_len": self.max_seq_len,
        }


def read_hf_config(folder: str | Path) -> HFModelSpec:
    """Parse ``folder/config.json``.

    Raises:
        HFImportError: missing file, unsupported architecture or setting (the message names the
            file and the key).
    """
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise HFImportError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    if not path.is_file():
        raise HFImportError(f"{path}: missing (a Hugging Face model folder needs config.json)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HFImportError(f"{path}: unreadable JSON ({e})") from e
    archs = raw.get("architectures") or []
    family = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if family is None:
        raise HFImportError(
            f"{path}: architectures={archs} is not supported; supported: {sorted(SUPPORTED)}"
        )
    return _spec(raw, family, path)


def _spec(raw: dict[str, Any], family: str, path: Path) -> HFModelSpec:
    def need(key: str) -> Any:
        if key not in raw:
            raise HFImportError(f"{path}: key '{key}' is missing")
        return raw[key]

    _refuse(raw, path, family)
    dim, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = raw.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        raise HFImportError(
            f"{path}: head_dim={head_dim} * num_attention_heads={heads} != hidden_size={dim} "
            "(sparsefusion needs head_dim = hidden_size / heads)"
        )
    theta, scaling = _rope(raw, path)
    eos = raw.get("eos_token_id")
    max_len = int(raw.get("max_position_embeddings", 4096))
    if family == "mistral" and raw.get("sliding_window"):  # the same graph up to the window
        max_len = min(max_len, int(raw["sliding_window"]))
    return HFModelSpec(
        family=family,
        vocab_size=int(need("vocab_size")),
        dim=dim,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        ffn_hidden=int(need("intermediate_size")),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_seq_len=max_len,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
    )


def _refuse(raw: dict[str, Any], path: Path, family: str) -> None:
    """Settings whose graph sparsefusion does not compute."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise HFImportError(f"{path}: hidden_act={act!r} is not supported (SwiGLU needs 'silu')")
    if raw.get("mlp_bias"):
        raise HFImportError(f"{path}: mlp_bias=true is not supported")
    if family == "llama" and raw.get("attention_bias"):
        raise HFImportError(f"{path}: attention_bias=true (a bias on o_proj) is not supported")
    if raw.get("use_sliding_window"):
        raise HFImportError(f"{path}: use_sliding_window=true is not supported")


def _rope(raw: dict[str, Any], path: Path) -> tuple[float, dict[str, Any]]:
    """RoPE base and scaling from either the v4 keys or transformers 5's ``rope_parameters``."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    theta = float(raw.get("rope_theta", params.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return theta, {"kind": "none"}
    if kind != "llama3":
        raise HFImportError(
            f"{path}: rope scaling type {kind!r} is not supported (supported: default, llama3)"
        )
    try:
        return theta, {
            "kind": "llama3",
            "factor": float(merged["factor"]),
            "low_freq_factor": float(merged["low_freq_factor"]),
            "high_freq_factor": float(merged["high_freq_factor"]),
            "original_max_position": int(merged["original_max_position_embeddings"]),
        }
    except KeyError as e:
        raise HFImportError(f"{path}: rope scaling 'llama3' lacks the key {e}") from e

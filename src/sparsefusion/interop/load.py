"""Stream a Hugging Face Llama/Qwen2/Mistral checkpoint into a sparsefusion decoder.

Every weight of the LLM goes, one tensor at a time, into the matching parameter of every tower
(and every expert of a tower's group): a dense model gets the LLM itself, a MoT/MoMa/hybrid model
gets the LLM in its text tower and copies in the others. Routers (experts, MoD), Transfusion's
patch layers and embedding rows the LLM does not have keep what they held (their fresh init).

Name map (HF ``model.layers.{i}.`` prefix -> sparsefusion ``layers.{i}.``): q/k/v_proj ->
rows of ``attention.wqkv`` (and its bias), o_proj -> ``attention.wo``, gate/up_proj -> rows of
``feed_forward.w13`` (or of each expert group's ``w13``), down_proj -> ``w2``,
input_layernorm -> ``attention_norm``, post_attention_layernorm -> ``ffn_norm``;
``model.norm`` -> ``norm``, ``model.embed_tokens`` / ``lm_head`` -> rows of ``embedding`` /
``output``.

Shape legend: G = towers (or experts) of a parameter, V = vocabulary rows, D = model width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsefusion.interop.hf_config import HFImportError, HFModelSpec, read_hf_config
from sparsefusion.interop.hf_weights import HFWeights
from sparsefusion.models.transformer import ModelConfig, Transformer
from sparsefusion.nn.rope import RopeScalingConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# Parameters that never come from the LLM (fresh init): routers, Transfusion patch layers.
FRESH = re.compile(r"(\.router$)|(^mod_routers\.)|(^patch_embed\.)|(^patch_head\.)")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Piece:
    """One HF tensor that fills ``rows`` of every copy (tower/expert) of a parameter."""

    hf_name: str
    rows: slice


@dataclass(frozen=True)
class RowMap:
    """Where the LLM's vocabulary rows go in the model's embedding/output tables.

    Attributes:
        offset: model row of LLM row 0 (0 for a plain import; the text offset of the unified
            vocabulary for a multimodal model).
        count: LLM rows copied (rows ``[0, count)``).
        extra: model row -> LLM row, further single rows to copy (e.g. BOS/EOS sentinels).
    """

    offset: int = 0
    count: int = -1
    extra: tuple[tuple[int, int], ...] = ()


def layer_pieces(rest: str, cfg: ModelConfig) -> list[Piece] | None:
    """HF tensors of one layer parameter (``rest`` = name after ``layers.{i}.``); None = fresh."""
    HK, JK, F = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    qkv = (
        ("q_proj", slice(0, HK)),
        ("k_proj", slice(HK, HK + JK)),
        ("v_proj", slice(HK + JK, None)),
    )
    mlp = (("gate_proj", slice(0, F)), ("up_proj", slice(F, 2 * F)))
    table = {
        "attention.wqkv.weight": [Piece(f"self_attn.{n}.weight", r) for n, r in qkv],
        "attention.wqkv.bias": [Piece(f"self_attn.{n}.bias", r) for n, r in qkv],
        "attention.wo.weight": [Piece("self_attn.o_proj.weight", slice(None))],
        "attention_norm.weight": [Piece("input_layernorm.weight", slice(None))],
        "ffn_norm.weight": [Piece("post_attention_layernorm.weight", slice(None))],
        "feed_forward.w13.weight": [Piece(f"mlp.{n}.weight", r) for n, r in mlp],
        "feed_forward.w2.weight": [Piece("mlp.down_proj.weight", slice(None))],
    }
    group = re.match(r"^feed_forward\.groups\.\d+\.(w13|w2)$", rest)
    if group:
        return table[f"feed_forward.{group.group(1)}.weight"]
    if rest in table:
        return table[rest]
    if FRESH.search(rest):
        return None
    raise HFImportError(
        f"model parameter layers.N.{rest} has no counterpart in a Llama/Qwen2 checkpoint "
        "(set model.qk_norm=false and norm_placement=pre, as init.from_hf does)"
    )


@torch.no_grad()
def load_hf_weights(
    model: Transformer, weights: HFWeights, spec: HFModelSpec, rows: RowMap | None = None
) -> set[str]:
    """Copy the checkpoint into ``model`` in place, tensor by tensor.

    Args:
        model: a decoder whose graph matches ``spec`` (dims, heads, bias, norms).
        weights: the open checkpoint.
        spec: its config.
        rows: where vocabulary rows go (default: LLM row i -> model row i, all rows).

    Returns:
        Names of the model parameters that were filled (the others kept their values).

    Raises:
        HFImportError: a missing tensor, a shape mismatch, or checkpoint tensors left unused.
    """
    rows = rows or RowMap(count=spec.vocab_size)
    filled: set[str] = set()
    for name, param in model.named_parameters():
        if name in ("embedding.weight", "output.weight"):
            _copy_rows(param, weights, _vocab_source(name, spec), spec, rows)
            filled.add(name)
            continue
        pieces = param_pieces(name, model.cfg)
        if pieces is None:
            continue
        for piece in pieces:
            target = param[:, piece.rows]  # (G, rows, ...): every tower/expert gets the copy
            tensor = weights.get(hf_name(name, piece.hf_name), tuple(target.shape[1:]))
            target.copy_(tensor.unsqueeze(0).expand_as(target))
            del tensor
        filled.add(name)
    _check_unused(weights, spec)
    return filled


def param_pieces(name: str, cfg: ModelConfig) -> list[Piece] | None:
    if name == "norm.weight":
        return [Piece("model.norm.weight", slice(None))]
    match = _LAYER.match(name)
    if match is None:
        if FRESH.search(name):
            return None
        raise HFImportError(f"model parameter {name} has no counterpart in the checkpoint")
    return layer_pieces(match.group(2), cfg)


def hf_name(name: str, hf: str) -> str:
    match = _LAYER.match(name)
    return f"model.layers.{match.group(1)}.{hf}" if match else hf


def _vocab_source(name: str, spec: HFModelSpec) -> str:
    if name == "embedding.weight" or spec.tie_embeddings:
        return "model.embed_tokens.weight"
    return "lm_head.weight"


def _copy_rows(
    table_VD: torch.Tensor, weights: HFWeights, hf_name: str, spec: HFModelSpec, rows: RowMap
) -> None:
    """LLM rows [0, count) -> model rows [offset, offset + count), plus the extra rows."""
    count = spec.vocab_size if rows.count < 0 else rows.count
    if rows.offset + count > table_VD.shape[0] or count > spec.vocab_size:
        raise HFImportError(
            f"{weights.folder}: {count} vocabulary rows from offset {rows.offset} do not fit a "
            f"table of {table_VD.shape[0]} rows (checkpoint vocab_size={spec.vocab_size})"
        )
    src_VD = weights.get(hf_name, (spec.vocab_size, table_VD.shape[1]))
    table_VD[rows.offset : rows.offset + count].copy_(src_VD[:count])
    for model_row, llm_row in rows.extra:
        table_VD[model_row].copy_(src_VD[llm_row])


def _check_unused(weights: HFWeights, spec: HFModelSpec) -> None:
    unused = [n for n in weights.unread() if not _IGNORED.search(n)]
    if spec.tie_embeddings:
        unused = [n for n in unused if n != "lm_head.weight"]
    if unused:
        raise HFImportError(
            f"{weights.folder}: {len(unused)} checkpoint tensor(s) have no place in the model, "
            f"e.g. {unused[:4]} (does config.json describe these weights?)"
        )


def dense_config(spec: HFModelSpec) -> ModelConfig:
    """The dense one-tower decoder config of an LLM (its own vocabulary)."""
    return ModelConfig(arch="dense", modalities=["text"], **_model_kwargs(spec))


def _model_kwargs(spec: HFModelSpec) -> dict:
    fields = spec.model_fields()
    fields["rope_scaling"] = RopeScalingConfig(**fields["rope_scaling"])
    return fields


def import_hf(folder: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build a dense sparsefusion decoder holding a Hugging Face LLM (same logits).

    The model is created on the meta device and materialised empty, then every parameter is
    filled from the checkpoint: the only full copy in memory is the model itself.

    Args:
        folder: a folder with ``config.json`` and ``model.safetensors`` (or an index + shards).
        dtype: parameter dtype.

    Returns:
        The model in eval mode; its vocabulary is the LLM's (id i = the LLM's token i).
    """
    spec = read_hf_config(folder)
    with torch.device("meta"):
        model = Transformer(dense_config(spec))
    model = model.to_empty(device="cpu").to(dtype)
    with HFWeights(folder) as weights:
        load_hf_weights(model, weights, spec)
    return model.eval()

"""Write a decoder (a dense model, or one tower of a MoT) as a Hugging Face Llama/Qwen2 folder.

``transformers.AutoModelForCausalLM.from_pretrained(folder)`` then computes the same logits for
the same ids: the inverse of ``load.py``'s name map. Q/K/V biases make it a Qwen2 model, else a
Llama. The graph must be one transformers has: pre-norm, no QK-norm, no Mixture-of-Depths, and a
plain FFN in the exported tower (MoMa's one-expert groups count as plain FFNs).

The vocabulary is the model's whole table (unified ids: specials, text, image codes, ...). For a
run, ``tokenizer.json`` is the run's text tokenizer with its ids moved up by the unified
vocabulary's text offset and the sentinels ``<pad> <bos> <eos> ...`` added at their ids, so the
Hugging Face tokenizer produces the ids the model was trained on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparsefusion.interop.load import FRESH, hf_name, param_pieces
from sparsefusion.models.transformer import ModelConfig, Transformer
from sparsefusion.tokenizers.vocab import NUM_SPECIAL_SLOTS, SPECIAL_TOKENS, UnifiedVocab

_GROUP = re.compile(r"feed_forward\.groups\.(\d+)\.")


class ExportError(ValueError):
    """The model cannot be written as a Hugging Face Llama/Qwen2 model (message says why)."""


def check_exportable(cfg: ModelConfig, tower: int) -> None:
    """Raise :class:`ExportError` unless tower ``tower`` of ``cfg`` is a Llama/Qwen2 graph."""
    problems = []
    if cfg.norm_placement != "pre":
        problems.append("model.norm_placement=post (Llama/Qwen2 are pre-norm)")
    if cfg.qk_norm:
        problems.append("model.qk_norm=true (Llama/Qwen2 have no QK-norm)")
    if cfg.mod.enabled:
        problems.append("Mixture-of-Depths layers")
    if cfg.arch == "moe":
        problems.append("arch moe (a mixed expert FFN)")
    if cfg.has_experts and cfg.arch != "moe":
        groups = cfg.ffn_group_names
        name = cfg.tower_names[tower]
        index = groups.index(name) if name in groups else 0
        experts = cfg.experts_per_group[index]
        if experts > 1 or cfg.moe.is_routed(experts):
            problems.append(f"tower {name!r} has a routed expert FFN")
    if cfg.latent_channels:
        problems.append("continuous image inputs (Transfusion)")
    if problems:
        raise ExportError(
            "--format hf needs a Llama/Qwen2 graph; this model has: "
            + "; ".join(problems)
            + ". Use --format hub (any architecture)."
        )


def hf_state_dict(model: Transformer, tower: int = 0) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of tower ``tower`` (shared weights as they are)."""
    check_exportable(model.cfg, tower)
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        p = param.detach()
        if name == "embedding.weight":
            out["model.embed_tokens.weight"] = p
            continue
        if name == "output.weight":
            out["lm_head.weight"] = p
            continue
        group = _GROUP.search(name)
        if FRESH.search(name) or (group and int(group.group(1)) != tower):
            continue
        copy = p[0] if (group or p.shape[0] == 1) else p[tower]
        for piece in param_pieces(name, model.cfg) or []:
            out[hf_name(name, piece.hf_name)] = copy[piece.rows]
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_config(cfg: ModelConfig, token_ids: dict[str, int | None] | None = None) -> dict[str, Any]:
    """The ``config.json`` of the exported model (v4-style RoPE keys, read by transformers 4/5)."""
    qwen = cfg.qkv_bias
    scaling = None
    if cfg.rope_scaling.kind == "llama3":
        rs = cfg.rope_scaling
        scaling = {"rope_type": "llama3", "factor": rs.factor,
                   "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                   "original_max_position_embeddings": rs.original_max_position}  # fmt: skip
    ids = token_ids or {}
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
        "torch_dtype": "float32",
    }
    if qwen:
        out |= {"use_sliding_window": False, "sliding_window": None}
    else:
        out |= {"attention_bias": False, "mlp_bias": False}
    return out


def export_hf(
    model: Transformer,
    out: str | Path,
    *,
    tower: int = 0,
    token_ids: dict[str, int | None] | None = None,
) -> Path:
    """Write ``out/config.json`` and ``out/model.safetensors`` (fp32).

    Args:
        model: the decoder.
        out: the output folder (created).
        tower: which tower to write (0 = the first; the text tower of the presets).
        token_ids: ``bos``/``eos``/``pad`` ids for config.json (None: unset).

    Raises:
        ExportError: the model is not a Llama/Qwen2 graph.
    """
    tensors = {k: v.float() for k, v in hf_state_dict(model, tower).items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model.cfg, token_ids)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def unified_tokenizer_json(text_json: str, vocab: UnifiedVocab) -> str:
    """A Hugging Face tokenizer producing unified ids: text ids moved up by the text offset,
    the sentinels added at their ids, and ``<bos>`` prepended to every encoding."""
    spec = json.loads(text_json)
    shift = vocab.offset("text")
    model = spec["model"]
    model["vocab"] = {tok: i + shift for tok, i in model["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        added["id"] += shift
    _shift_post_processor(spec.get("post_processor"), shift)
    specials = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }  # fmt: skip
        for i, tok in enumerate(SPECIAL_TOKENS)
    ]
    spec["added_tokens"] = specials + list(spec.get("added_tokens") or [])
    if not spec.get("post_processor"):
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [vocab.bos_id],
                                         "tokens": ["<bos>"]}},
        }  # fmt: skip
    assert shift == NUM_SPECIAL_SLOTS
    return json.dumps(spec, ensure_ascii=False)


def _shift_post_processor(node: Any, shift: int) -> None:
    """Move the ids a post-processor names (TemplateProcessing, Sequence of processors)."""
    if isinstance(node, dict):
        for entry in (node.get("special_tokens") or {}).values():
            entry["ids"] = [i + shift for i in entry.get("ids", [])]
        for key in ("bos", "eos", "cls", "sep"):  # Bert/Roberta-style (token, id) pairs
            if isinstance(node.get(key), list) and len(node[key]) == 2:
                node[key][1] += shift
        for child in node.get("processors") or []:
            _shift_post_processor(child, shift)


def write_tokenizer(out: str | Path, text_json: str, vocab: UnifiedVocab) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` for the exported model."""
    out = Path(out)
    (out / "tokenizer.json").write_text(unified_tokenizer_json(text_json, vocab), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
              "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

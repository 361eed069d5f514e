"""Start a run from a pretrained text LLM (``init.*``): the LMFusion / Bagel recipe.

``init.from_hf=DIR`` (a Hugging Face Llama/Qwen2/Mistral folder) makes the run's decoder the
LLM's graph (width, layers, heads, GQA, RoPE, norms, biases, tied head; pre-norm, no QK-norm:
:func:`resolve_init` writes these ``model.*`` settings into the run's config) and uses the LLM's
``tokenizer.json`` as the text tokenizer (``tokenizer.text_path``). At the start of a fresh run
:func:`apply_init` streams the LLM into the text tower and copies it into every other tower (the
image and speech towers start as the LLM); routers keep their fresh init. Any arch works: dense,
MoT, MoMa, hybrid.

Vocabulary: unified id ``16 + i`` is the LLM's token ``i`` (``tokenizers/vocab.py``). Rows the LLM
does not have -- the sentinels ``<pad> <bos> <eos> <boi> <eoi> <boa> <eoa>``, image codes, speech
units and padding rows -- start as the mean of the LLM's rows (embedding and output head alike),
except ``<bos>`` and ``<eos>``, which copy the LLM's own BOS/EOS rows when config.json names them.
So at step 0 the text logits (columns ``16 .. 16 + T``) of a text-only sequence are the LLM's.

``init.freeze=text`` (LMFusion, arXiv 2412.15188) trains only what is new: see ``freeze.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sparsefusion.interop.hf_config import HFImportError, HFModelSpec, read_hf_config
from sparsefusion.interop.hf_weights import HFWeights
from sparsefusion.interop.load import RowMap, load_hf_weights
from sparsefusion.models.transformer import Transformer
from sparsefusion.tokenizers.vocab import TEXT_MODALITY, UnifiedVocab

if TYPE_CHECKING:
    from sparsefusion.runs.config import TrainConfig

log = logging.getLogger("sparsefusion")


def resolve_init(cfg: TrainConfig) -> TrainConfig:
    """The run config with the LLM's architecture and tokenizer filled in (no-op without
    ``init.from_hf``). Call before the tokenizer is built and before ``config.yaml`` is written.

    Raises:
        HFImportError: a bad folder (names the file and key).
        ValueError: a conflicting setting, or a resume of a run that was started otherwise.
    """
    from sparsefusion.config import merge

    _check_resume(cfg)
    if not cfg.init.from_hf:
        return cfg
    if cfg.init.freeze != "none" and _fsdp(cfg):
        raise ValueError(
            "init.freeze=text is not supported with FSDP (its sharded parameters replace the "
            "frozen ones); use dist.strategy=ddp or one process"
        )
    folder = Path(cfg.init.from_hf).resolve()
    spec = read_hf_config(folder)
    if not (folder / "tokenizer.json").is_file():
        raise HFImportError(f"{folder / 'tokenizer.json'}: missing (init.from_hf uses it for text)")
    if cfg.model.upcycle_from:
        raise ValueError("init.from_hf and model.upcycle_from are two seeds: set only one")
    if cfg.tokenizer.path:
        raise ValueError(
            f"init.from_hf uses {folder / 'tokenizer.json'} for text; tokenizer.path="
            f"{cfg.tokenizer.path!r} would replace it: set only one"
        )
    fields = spec.model_fields()
    fields.pop("vocab_size")  # the unified vocabulary is larger: set from the tokenizer
    model = merge(cfg.model, fields, where="model")
    if model.has_experts and model.moe.experts.get(_text_tower(model), 1) > 1:
        raise ValueError(
            "init.from_hf: the text tower must keep one FFN (model.moe.experts"
            f"[{_text_tower(model)!r}] > 1 would not compute the LLM at step 0); e.g. "
            "model.moe.experts={text: 1, image: 4}"
        )
    tokenizer = dataclasses.replace(cfg.tokenizer, text_path=str(folder / "tokenizer.json"))
    init = dataclasses.replace(cfg.init, from_hf=str(folder))
    return dataclasses.replace(cfg, model=model, tokenizer=tokenizer, init=init)


def _fsdp(cfg: TrainConfig) -> bool:
    """Whether this (already initialised) process group trains with FSDP."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return cfg.dist.resolved_strategy(distributed) == "fsdp"


def _text_tower(model_cfg) -> str:
    return model_cfg.tower_names[model_cfg.tower_of_modality[0]]


def _check_resume(cfg: TrainConfig) -> None:
    """Refuse ``init.from_hf`` on a run folder holding checkpoints of a run started otherwise."""
    from sparsefusion.checkpoint.resume import step_folders
    from sparsefusion.config import load_yaml
    from sparsefusion.runs.folder import config_path

    run_dir = Path(cfg.run.dir)
    path = config_path(run_dir)
    if not path.is_file() or not step_folders(run_dir):
        return
    old = str((load_yaml(path).get("init") or {}).get("from_hf", ""))
    new = str(Path(cfg.init.from_hf).resolve()) if cfg.init.from_hf else ""
    if old != new:
        raise ValueError(
            f"{path}: init.from_hf={new or '(none)'!r}, but the run folder holds checkpoints of "
            f"a run started with init.from_hf={old or '(none)'!r}; a resumed run keeps its own "
            "start: use another run.dir or the run's own init settings"
        )


@torch.no_grad()
def apply_init(model: Transformer, cfg: TrainConfig, vocab: UnifiedVocab, *, resumed: bool) -> None:
    """The trainer's one hook at model-build time (no-op without ``init.from_hf``).

    A fresh run gets the LLM's weights (see the module docstring); a resumed run keeps its
    checkpoint's. Either way ``init.freeze=text`` is set up.

    Args:
        model: the freshly built, initialised model (before parallelisation).
        cfg: the resolved run config (:func:`resolve_init`).
        vocab: the run's unified vocabulary (its text ids are the LLM's tokenizer's).
        resumed: the run resumes from a checkpoint (weights are loaded later by the trainer).
    """
    if not cfg.init.from_hf:
        return
    folder = Path(cfg.init.from_hf)
    spec = read_hf_config(folder)
    rows = text_rows(spec, vocab, folder)
    if not resumed:
        with HFWeights(folder) as weights:
            load_hf_weights(model, weights, spec, rows)
        init_new_rows(model, rows)
        log.info("init.from_hf: %s (%s) in every tower of %s; %d LLM vocabulary rows at %d, "
                 "new rows = their mean", folder, spec.family, model.cfg.tower_names,
                 rows.count, rows.offset)  # fmt: skip
    if cfg.init.freeze == "text":
        from sparsefusion.interop.freeze import freeze_text

        frozen = freeze_text(model, rows)
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trained -= sum(p[idx].numel() for p, idx in frozen.parts)
        log.info("init.freeze=text: %.2fM of %.2fM parameters train", trained / 1e6, total / 1e6)


def text_rows(spec: HFModelSpec, vocab: UnifiedVocab, folder: Path) -> RowMap:
    """Where the LLM's vocabulary goes in the unified one (text ids, plus BOS/EOS sentinels).

    Raises:
        HFImportError: the tokenizer has more ids than the checkpoint has embedding rows.
    """
    count = vocab.modality_sizes[TEXT_MODALITY]
    if count > spec.vocab_size:
        raise HFImportError(
            f"{folder / 'tokenizer.json'} has {count} ids but {folder / 'config.json'} "
            f"vocab_size={spec.vocab_size}: the tokenizer does not match the weights"
        )
    extra = []
    for sentinel, llm_id in ((vocab.bos_id, spec.bos_token_id), (vocab.eos_id, spec.eos_token_id)):
        if llm_id is not None and 0 <= llm_id < spec.vocab_size:
            extra.append((sentinel, int(llm_id)))
    return RowMap(offset=vocab.offset(TEXT_MODALITY), count=count, extra=tuple(extra))


def new_row_mask(num_rows: int, rows: RowMap) -> torch.Tensor:
    """True at the rows that do not come from the LLM."""
    new_V = torch.ones(num_rows, dtype=torch.bool)
    new_V[rows.offset : rows.offset + rows.count] = False
    for model_row, _ in rows.extra:
        new_V[model_row] = False
    return new_V


@torch.no_grad()
def init_new_rows(model: Transformer, rows: RowMap) -> None:
    """Set every row the LLM does not have to the mean of the LLM's rows (per table)."""
    tables = [model.embedding.weight]
    if not model.cfg.tie_embeddings:
        tables.append(model.output.weight)
    for table_VD in tables:
        new_V = new_row_mask(table_VD.shape[0], rows).to(table_VD.device)
        mean_D = table_VD[rows.offset : rows.offset + rows.count].mean(dim=0)
        table_VD[new_V] = mean_D.to(table_VD.dtype)

"""Runs as ``save_pretrained`` / ``from_pretrained`` folders in the Hub's conventions.

:func:`hub_class` gives the decoder with ``huggingface_hub.PyTorchModelHubMixin`` mixed in (built
on first use: the core never imports ``huggingface_hub``). A folder holds ``config.json``
(``{"model": <the model.* settings>}``), ``model.safetensors`` and a model card ``README.md``
(architecture, data, steps, final per-modality losses from ``metrics.jsonl``), plus the run's
tokenizer in ``tokenizer/`` when ``sparsefusion export --format hub`` writes it. With network
access and a token, ``hub_class().from_pretrained(folder).push_to_hub("user/name")`` publishes
it (not tested here).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from sparsefusion.config import from_dict, to_dict
from sparsefusion.models.transformer import ModelConfig, Transformer

REPO_URL = "https://github.com/sparsefusion/sparsefusion"


@functools.cache
def hub_class() -> type[Transformer]:
    """``SparsefusionModel``: the decoder with the Hub mixin (``save_pretrained`` & co)."""
    from huggingface_hub import ModelCard, PyTorchModelHubMixin

    class SparsefusionModel(
        Transformer,
        PyTorchModelHubMixin,
        library_name="sparsefusion",
        tags=["sparsefusion", "mixed-modal", "early-fusion"],
        repo_url=REPO_URL,
    ):
        """The sparsefusion decoder, saved and loaded with the Hub mixin.

        Args:
            model: the ``model.*`` settings (a plain mapping, as config.json stores it).
        """

        def __init__(self, model: dict[str, Any]):
            super().__init__(from_dict(ModelConfig, model, where="model"))
            self.card_text: str | None = None

        def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
            return ModelCard(self.card_text or _minimal_card(self.cfg))

    return SparsefusionModel


def to_hub_model(model: Transformer, card: str | None = None) -> Transformer:
    """A Hub-mixin copy of ``model`` sharing its parameters (no weights are copied)."""
    hub = hub_class()(to_dict(model.cfg))
    hub.load_state_dict(model.state_dict(), strict=True, assign=True)
    hub.card_text = card
    return hub.eval()


def _minimal_card(cfg: ModelConfig) -> str:
    return (
        "---\nlibrary_name: sparsefusion\ntags: [sparsefusion, mixed-modal]\n---\n"
        f"# sparsefusion {cfg.arch} model\n\n{architecture_lines(cfg)}\n"
    )


def architecture_lines(cfg: ModelConfig) -> str:
    """The architecture as a Markdown list."""
    towers = ", ".join(cfg.tower_names)
    rows = [
        f"- arch: `{cfg.arch}`; towers: {towers}; modalities: {', '.join(cfg.modalities)}",
        f"- {cfg.num_layers} layers, width {cfg.dim}, {cfg.num_heads} heads "
        f"({cfg.kv_heads} key/value), FFN {cfg.hidden_dim}, vocabulary {cfg.vocab_size}",
        f"- norm: {cfg.norm_placement}-norm, QK-norm {cfg.qk_norm}, RoPE theta {cfg.rope_theta}"
        + (f" ({cfg.rope_scaling.kind} scaling)" if cfg.rope_scaling.kind != "none" else ""),
    ]
    if cfg.has_experts:
        groups = dict(zip(cfg.ffn_group_names, cfg.experts_per_group, strict=True))
        rows.append(f"- experts per FFN group: {groups} ({cfg.moe.router}, "
                    f"capacity {cfg.moe.capacity})")  # fmt: skip
    if cfg.mod.enabled:
        rows.append(f"- Mixture-of-Depths capacity {cfg.mod.capacity}")
    return "\n".join(rows)


def model_card(run_dir: Path, config: dict[str, Any], rows: list[dict[str, Any]], checkpoint: str,
               model_cfg: ModelConfig) -> str:  # fmt: skip
    """The README.md of a run's Hub folder."""
    train_rows = [r for r in rows if "split" not in r]
    val_rows = [r for r in rows if r.get("split") == "val"]
    data = config.get("data", {})
    init = config.get("init") or {}
    lines = [
        "---",
        "library_name: sparsefusion",
        "tags: [sparsefusion, mixed-modal, early-fusion, " + model_cfg.arch + "]",
        "---",
        f"# {run_dir.name}: sparsefusion {model_cfg.arch} model",
        "",
        "## Architecture",
        architecture_lines(model_cfg),
        "",
        "## Data",
        f"- source: `{data.get('source', '?')}`; sequence length {data.get('seq_len', '?')}, "
        f"batch {data.get('batch_size', '?')} rows",
    ]
    if init.get("from_hf"):
        lines.append(f"- started from the Hugging Face LLM `{init['from_hf']}` "
                     f"(freeze: {init.get('freeze', 'none')})")  # fmt: skip
    last = train_rows[-1] if train_rows else {}
    lines += [
        "",
        "## Training",
        f"- steps: {last.get('step', '?')} of {config.get('train', {}).get('steps', '?')}; "
        f"tokens: {last.get('tokens', '?')}; checkpoint `{checkpoint}`",
        "",
        "## Final losses",
        *_loss_table(train_rows[-1:] + val_rows[-1:]),
        "",
        "## Use",
        "```python",
        "from sparsefusion.interop.hub import hub_class",
        "model = hub_class().from_pretrained(FOLDER_OR_REPO)",
        "```",
    ]
    return "\n".join(lines) + "\n"


def _loss_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(no metrics.jsonl rows)"]
    keys = sorted({k for r in rows for k in r if k.startswith("loss")},
                  key=lambda k: (k != "loss", k))  # fmt: skip
    out = ["| split | step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        vals = [f"{r[k]:.4f}" if isinstance(r.get(k), int | float) else "" for k in keys]
        out.append(f"| {r.get('split', 'train')} | {r.get('step')} | " + " | ".join(vals) + " |")
    return out

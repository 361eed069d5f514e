"""Export back to Hugging Face: Llama/Qwen2 folders (round trip, MoT text tower) and Hub folders."""

from __future__ import annotations

import pytest
import torch
from interop_helpers import hf_logits

from sparsefusion.cli.main import main
from sparsefusion.interop.export_hf import ExportError, check_exportable, export_hf
from sparsefusion.interop.export_run import load_run_model
from sparsefusion.interop.forward import text_logits
from sparsefusion.interop.hf_config import read_hf_config
from sparsefusion.interop.load import import_hf
from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.nn.moe import MoEConfig
from sparsefusion.runs.tokenizer import run_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
def test_import_then_export_round_trip(family, request, tmp_path):
    folder = request.getfixturevalue(family)
    spec = read_hf_config(folder)
    ids = {"bos": spec.bos_token_id, "eos": spec.eos_token_id}
    out = export_hf(import_hf(folder), tmp_path / "out", token_ids=ids)
    x = torch.randint(0, spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    diff = (hf_logits(out, x) - hf_logits(folder, x)).abs().max().item()
    print(f"{family}: import -> export -> transformers, max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_mot_text_tower_exports_as_llama_with_its_tokenizer(mot_run, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    assert main(["export", str(mot_run), "--format", "hf", "--out", str(out)]) == 0
    model, cfg, _ = load_run_model(mot_run)
    tok = run_tokenizer(mot_run, cfg)
    T = tok.vocab.modality_sizes["text"]
    x = torch.randint(16, 16 + T, (2, 32), generator=torch.Generator().manual_seed(6))
    diff = (hf_logits(out, x) - text_logits(model, x)).abs().max().item()
    print(f"MoT run, text tower -> transformers Llama: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "hello world, a red square"
    assert hf_tok(text)["input_ids"] == [tok.vocab.bos_id] + [16 + i for i in tok.text.encode(text)]


def test_hub_folder_loads_back_with_identical_logits_and_a_card(mot_run, tmp_path):
    from sparsefusion.interop.hub import hub_class

    out = tmp_path / "hub"
    assert main(["export", str(mot_run), "--format", "hub", "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    model, cfg, _ = load_run_model(mot_run)
    loaded = hub_class().from_pretrained(out)
    tok = run_tokenizer(mot_run, cfg)
    image = tok.vocab.offset("image")
    ids_BT = torch.tensor([[1, 20, 30, 3, image, image + 5, image + 9, 4, 40, 2]])
    modality_BT = tok.vocab.modality_of(ids_BT)

    def logits(m):
        inputs = ModelInputs(
            tokens_BT=ids_BT, position_BT=torch.arange(10)[None], document_BT=0 * ids_BT,
            plan=m.build_plan(modality_BT), modality_BT=modality_BT,
        )  # fmt: skip
        with torch.no_grad():
            return m(inputs).logits_BTV

    assert torch.equal(logits(model), logits(loaded))
    card = (out / "README.md").read_text()
    assert "## Final losses" in card and "mot" in card and "loss/image" in card
    last = [r for r in _rows(mot_run) if "split" not in r][-1]
    assert f"{last['loss']:.4f}" in card


def _rows(run):
    from sparsefusion.runs.folder import read_metrics

    return read_metrics(run / "metrics.jsonl")


def test_chameleon_graph_is_refused_with_a_pointer_to_hub():
    with pytest.raises(ExportError, match="norm_placement=post.*qk_norm.*--format hub"):
        check_exportable(ModelConfig(), 0)


def test_moma_one_expert_text_group_is_exportable_routed_is_not():
    pre = {"norm_placement": "pre", "qk_norm": False, "arch": "moma"}
    check_exportable(ModelConfig(**pre, moe=MoEConfig(experts={"text": 1, "image": 4})), 0)
    with pytest.raises(ExportError, match="routed expert FFN"):
        check_exportable(ModelConfig(**pre, moe=MoEConfig(experts={"text": 4, "image": 4})), 0)

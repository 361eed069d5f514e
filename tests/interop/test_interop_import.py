"""Import of Hugging Face Llama/Qwen2 checkpoints into a dense decoder: logits parity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from interop_helpers import hf_logits

from sparsefusion.interop.forward import text_logits
from sparsefusion.interop.hf_config import HFImportError, read_hf_config
from sparsefusion.interop.load import import_hf

pytest.importorskip("transformers")

TOL = 1e-4


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2", "tiny_mistral"])
def test_import_logits_equal_transformers(family, request):
    folder = request.getfixturevalue(family)
    ids = _ids(320)
    ours = text_logits(import_hf(folder), ids)
    theirs = hf_logits(folder, ids)
    diff = (ours - theirs).abs().max().item()
    print(f"{family}: max |logits diff| = {diff:.2e}")
    assert diff <= TOL


def test_spec_reads_llama3_scaling_and_qwen2_features(tiny_llama, tiny_qwen2):
    llama, qwen = read_hf_config(tiny_llama), read_hf_config(tiny_qwen2)
    assert llama.rope_scaling["kind"] == "llama3" and llama.num_kv_heads == 2
    assert not llama.qkv_bias and not llama.tie_embeddings
    assert qwen.qkv_bias and qwen.tie_embeddings and qwen.rope_scaling == {"kind": "none"}
    model = import_hf(tiny_qwen2)
    assert "output.weight" not in model.state_dict()  # tied: the table is stored once


def test_sharded_checkpoint(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(out, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    ids = _ids(320, seed=1)
    diff = (text_logits(import_hf(out), ids) - hf_logits(tiny_llama, ids)).abs().max()
    assert diff <= TOL


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config_and_weights(tiny_llama, tmp_path):
    with pytest.raises(HFImportError, match="config.json"):
        import_hf(tmp_path)
    folder = _copy(tiny_llama, tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(HFImportError, match="no weights"):
        import_hf(folder)


def test_unsupported_architecture_lists_supported(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "gpt2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFImportError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        import_hf(folder)


def test_missing_shard_names_index_and_file(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(out, max_shard_size="100KB")
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(HFImportError, match=f"index.json.*{shard.name}"):
        import_hf(out)


def test_wrong_shape_names_file_and_tensor(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "shape")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFImportError, match=r"model.safetensors: tensor 'model.layers.0.mlp"):
        import_hf(folder)

"""MoT (and MoMa) from a text LLM: step-0 parity, init.freeze=text, resume and vocabulary checks."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from interop_helpers import hf_logits
from safetensors.torch import load_file

from sparsefusion.checkpoint.store import latest_checkpoint
from sparsefusion.interop.forward import text_logits
from sparsefusion.interop.hf_config import HFImportError
from sparsefusion.interop.init import apply_init, resolve_init
from sparsefusion.models.transformer import Transformer
from sparsefusion.runs.presets import resolve_config
from sparsefusion.runs.tokenizer import finalize_config
from sparsefusion.tokenizers.text_bpe import BPETextTokenizer
from sparsefusion.tokenizers.vocab import UnifiedVocab
from sparsefusion.train.trainer import train

pytest.importorskip("transformers")


def _cfg(preset, run_dir, cache, *extra):
    base = [f"run.dir={run_dir}", f"tokenizer.cache_dir={cache}", "run.progress=log",
            "run.log_every=1", "run.eval_every=0", "data.val_batches=1"]  # fmt: skip
    return resolve_config(preset, [*base, *extra])


def _step0_model(cfg):
    """What the trainer builds for a fresh run, without the VQ (the vocab needs only sizes)."""
    cfg = resolve_init(cfg)
    text = BPETextTokenizer.load(cfg.tokenizer.text_path)
    vocab = UnifiedVocab({"text": text.vocab_size, "image": cfg.tokenizer.image.codebook_size})
    fake = SimpleNamespace(modalities=vocab.modalities, vocab=vocab, bind_model=lambda m: m)
    cfg = finalize_config(cfg, fake)
    model = Transformer(cfg.model)
    model.init_weights()
    apply_init(model, cfg, vocab, resumed=False)
    return model.eval(), vocab


@pytest.mark.parametrize(
    "preset,family",
    [("mot-debug", "tiny_llama"), ("moma-1t1i-debug", "tiny_llama"), ("mot-debug", "tiny_qwen2")],
)
def test_step0_text_logits_equal_the_llm(preset, family, request, tmp_path, tokenizer_cache):
    folder = request.getfixturevalue(family)
    model, vocab = _step0_model(_cfg(preset, tmp_path, tokenizer_cache, f"init.from_hf={folder}"))
    T = vocab.modality_sizes["text"]
    llm_ids = torch.randint(0, T, (2, 40), generator=torch.Generator().manual_seed(3))
    ours = text_logits(model, llm_ids + vocab.offset("text"))[..., 16 : 16 + T]
    theirs = hf_logits(folder, llm_ids)[..., :T]
    diff = (ours - theirs).abs().max().item()
    print(f"{preset} from {family}, step 0: max |text logits diff| = {diff:.2e}")
    assert diff <= 1e-4
    assert model.cfg.num_towers == 2 and not model.cfg.qk_norm
    emb = model.embedding.weight
    image_rows = emb[vocab.offset("image") : vocab.offset("image") + 64]
    assert torch.allclose(image_rows, emb[16 : 16 + T].mean(0).expand_as(image_rows))


def _hf_tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def test_freeze_text_keeps_the_llm_bit_identical_and_trains_the_rest(
    tiny_llama, tmp_path, tokenizer_cache
):
    run = tmp_path / "run"
    extra = (f"init.from_hf={tiny_llama}", "init.freeze=text", "train.steps=20",
             "run.save_every=20", "optim.warmup_steps=0")  # fmt: skip
    train(_cfg("mot-debug", run, tokenizer_cache, *extra))
    ckpt = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    hf = _hf_tensors(tiny_llama)
    T = BPETextTokenizer.load(tiny_llama / "tokenizer.json").vocab_size
    p = "model.layers.1."
    qkv = torch.cat([hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
    w13 = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
    text, image = 0, 1
    assert torch.equal(ckpt["layers.1.attention.wqkv.weight"][text], qkv)
    assert torch.equal(ckpt["layers.1.feed_forward.w13.weight"][text], w13)
    assert torch.equal(
        ckpt["layers.1.ffn_norm.weight"][text], hf[p + "post_attention_layernorm.weight"]
    )
    assert torch.equal(ckpt["norm.weight"][0], hf["model.norm.weight"])
    assert torch.equal(ckpt["embedding.weight"][16 : 16 + T], hf["model.embed_tokens.weight"][:T])
    assert torch.equal(ckpt["output.weight"][16 : 16 + T], hf["lm_head.weight"][:T])
    # The image tower and the new rows moved.
    assert not torch.equal(ckpt["layers.1.attention.wqkv.weight"][image], qkv)
    assert not torch.equal(ckpt["layers.1.feed_forward.w13.weight"][image], w13)
    assert not torch.equal(ckpt["embedding.weight"][3], ckpt["embedding.weight"][4])  # boi, eoi

    # Resuming (same init) keeps the LLM frozen: the snapshot is taken after the checkpoint loads.
    train(_cfg("mot-debug", run, tokenizer_cache, *extra[:-2], "train.steps=22",
               "run.save_every=22"))  # fmt: skip
    resumed = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert latest_checkpoint(run).name.endswith("22")
    assert torch.equal(resumed["layers.1.attention.wqkv.weight"][text], qkv)
    assert torch.equal(
        resumed["embedding.weight"][16 : 16 + T], hf["model.embed_tokens.weight"][:T]
    )
    assert not torch.equal(resumed["layers.1.attention.wqkv.weight"][image],
                           ckpt["layers.1.attention.wqkv.weight"][image])  # fmt: skip

    # Resuming with another (or no) init.from_hf is refused before any step.
    for other in (f"init.from_hf={tmp_path}", "init.from_hf="):
        with pytest.raises(ValueError, match="init.from_hf"):
            train(_cfg("mot-debug", run, tokenizer_cache, other, "train.steps=21"))


def test_tokenizer_larger_than_the_embedding_is_refused(tiny_llama, tmp_path, tokenizer_cache):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    extra = {f"tok{i}": 400 + i for i in range(100)}  # 100 more ids than embedding rows
    tok["model"]["vocab"].update(extra)
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(HFImportError, match="tokenizer.json has .* ids but .*config.json"):
        _step0_model(_cfg("mot-debug", tmp_path / "run", tokenizer_cache, f"init.from_hf={folder}"))


def test_missing_tokenizer_and_conflicting_seed(tiny_llama, tmp_path, tokenizer_cache):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(HFImportError, match="tokenizer.json"):
        resolve_init(_cfg("mot-debug", tmp_path / "r", tokenizer_cache, f"init.from_hf={folder}"))
    with pytest.raises(ValueError, match="tokenizer.path"):
        resolve_init(_cfg("mot-debug", tmp_path / "r", tokenizer_cache,
                          f"init.from_hf={tiny_llama}", f"tokenizer.path={tmp_path}"))  # fmt: skip
    with pytest.raises(ValueError, match="init.freeze=text needs init.from_hf"):
        _cfg("mot-debug", tmp_path / "r", tokenizer_cache, "init.freeze=text")


def test_a_run_started_from_an_llm_generates_and_evaluates_like_any_other(mot_run, tmp_path):
    from sparsefusion.cli.main import main
    from sparsefusion.eval.run_eval import EvalConfig, evaluate_run
    from sparsefusion.runs.folder import read_metrics

    out = tmp_path / "gen"
    args = ["generate", str(mot_run), "--prompt", "hello world", "--max-new-tokens", "4",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert (out / "index.html").is_file()
    val = [r for r in read_metrics(mot_run / "metrics.jsonl") if r.get("split") == "val"][-1]
    row, _ = evaluate_run(mot_run, EvalConfig(generate=False, device="cpu", samples=False))
    assert row["loss/batch"] == val["loss"]

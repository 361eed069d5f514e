"""Training in the Transfusion setting: every architecture trains and logs both losses; resume
with another patch size or VAE is refused; resumed equals uninterrupted."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.trainer import train

pytest.importorskip("diffusers", reason="the transfusion extra is not installed")

ARCHS = ["dense", "mot", "moe", "moma", "mod", "hybrid"]


def _cfg(run_dir: Path, cache: str, *extra: str, arch: str = "mot"):
    return resolve_config(
        f"tf-{arch}-debug",
        [f"run.dir={run_dir}", f"tokenizer.cache_dir={cache}", "run.progress=log", *extra],
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_trains_and_logs_both_losses(tmp_path, tokenizer_cache, arch):
    cfg = _cfg(tmp_path, tokenizer_cache, "train.steps=3", "run.log_every=1", arch=arch)
    last = train(cfg)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["loss/text"] > 0 and r["loss/image"] > 0 and r["flops"] > 0
    assert "loss/image" in last["val"] and "loss/text" in last["val"]


def test_resume_with_another_patch_size_or_vae_is_refused(tmp_path, tokenizer_cache):
    common = ("train.steps=2", "run.save_every=2", "run.eval_every=0")
    train(_cfg(tmp_path, tokenizer_cache, *common))
    with pytest.raises(ValueError, match="patch_size"):
        train(_cfg(tmp_path, tokenizer_cache, *common, "model.patch_size=4", "train.steps=3"))
    with pytest.raises(ValueError, match="tokenizer.vae.kl_weight"):
        train(_cfg(tmp_path, tokenizer_cache, *common, "tokenizer.vae.kl_weight=0.001"))


def test_resumed_equals_uninterrupted(tmp_path, tokenizer_cache):
    common = ("run.log_every=1", "run.save_every=2", "run.eval_every=0", "train.steps=4")
    train(_cfg(tmp_path / "a", tokenizer_cache, *common))
    train(_cfg(tmp_path / "b", tokenizer_cache, *common, "train.stop_at=2"))
    train(_cfg(tmp_path / "b", tokenizer_cache, *common))
    a, b = (
        {r["step"]: r for r in read_metrics(p / "metrics.jsonl") if "split" not in r}
        for p in (tmp_path / "a", tmp_path / "b")
    )
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss/text", "loss/image", "tokens", "flops"):
            assert a[step][key] == b[step][key], (step, key)


def test_cli_generates_images_and_captions_and_inspects_the_vae(tmp_path, tokenizer_cache, capsys):
    from sparsefusion.cli.main import main

    run = tmp_path / "run"
    train(_cfg(run, tokenizer_cache, "train.steps=2", "run.save_every=2", "run.eval_every=0"))
    out = tmp_path / "samples"
    args = ["generate", str(run), "--prompt", "a red circle", "--mode", "text_to_image"]
    assert (
        main([*args, "--cfg", "2", "--diffusion-steps", "3", "--num", "2", "--out", str(out)]) == 0
    )
    assert len(list(out.glob("sample_*_image_0.png"))) == 2 and (out / "index.html").is_file()
    cap = tmp_path / "captions"
    image = next(out.glob("sample_*_image_0.png"))
    args = ["generate", str(run), "--image", str(image), "--max-new-tokens", "5", "--out", str(cap)]
    assert main(args) == 0
    assert (cap / "index.html").is_file()
    preview = tmp_path / "preview"
    args = ["data", "preview", "scenes", "--preset", "tf-mot-debug", "--docs", "20"]
    assert main([*args, f"tokenizer.cache_dir={tokenizer_cache}", "--out", str(preview)]) == 0
    assert (preview / "grid.png").is_file()
    tok_dir = next(p for p in Path(tokenizer_cache).iterdir() if (p / "image_vae.json").is_file())
    capsys.readouterr()
    assert main(["tokenizer", "inspect", str(tok_dir)]) == 0
    assert "VAE latent 4x8x8" in capsys.readouterr().out

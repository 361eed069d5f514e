"""Training in the Transfusion setting: every architecture trains and logs both losses; resume
with another patch size, VAE or image loss is refused; resumed equals uninterrupted (DDPM and
flow); background loading and `data tokenize` shards give the losses of loading in the training
thread; a flow run generates images with the auto sampler."""

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
    with pytest.raises(ValueError, match=r"model\.patch_size: 2 -> 4"):
        train(_cfg(tmp_path, tokenizer_cache, *common, "model.patch_size=4", "train.steps=3"))
    with pytest.raises(ValueError, match=r"tokenizer\.vae\.kl_weight: "):
        train(_cfg(tmp_path, tokenizer_cache, *common, "tokenizer.vae.kl_weight=0.001"))


@pytest.mark.parametrize("image_loss", ["ddpm", "flow"])
def test_resumed_equals_uninterrupted(tmp_path, tokenizer_cache, image_loss):
    common = ("run.log_every=1", "run.save_every=2", "run.eval_every=0", "train.steps=4",
              f"objective.image_loss={image_loss}")  # fmt: skip
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


def _rows(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k.startswith("loss") or k in ("step", "split", "tokens")}
        for r in read_metrics(run_dir / "metrics.jsonl")
    ]


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_background_loading_gives_the_losses_of_loading_in_the_training_thread(
    tmp_path, tokenizer_cache, kind
):
    common = ("train.steps=4", "run.log_every=1", "run.eval_every=2", "train.threads=1")
    train(_cfg(tmp_path / "sync", tokenizer_cache, *common, "data.workers=0"))
    train(_cfg(tmp_path / "bg", tokenizer_cache, *common, "data.workers=1",
               f"data.worker_kind={kind}"))  # fmt: skip
    sync, bg = _rows(tmp_path / "sync"), _rows(tmp_path / "bg")
    assert len(sync) == 6 and sync == bg  # 4 train rows and 2 validations, bit for bit


def test_token_shards_give_the_losses_of_the_source(tmp_path, tokenizer_cache):
    from sparsefusion.cli.main import main

    # One 64-document encoder call per shard, as the loaders' 64-document chunks (16 validation
    # batches of 4 rows read 64 documents at a time): the VAE sees the same image batches, so
    # the latents are the same to the bit (its convolutions are not batch-size invariant).
    shards = tmp_path / "shards"
    argv = ["data", "tokenize", "scenes", "--preset", "tf-mot-debug", "--out", str(shards),
            "--docs", "128", "--val-docs", "256", "--docs-per-shard", "64", "--quiet",
            f"tokenizer.cache_dir={tokenizer_cache}"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in (shards / "train").glob("shard_00000.*")) == [
        "shard_00000.ids.npy", "shard_00000.json", "shard_00000.mod.npy", "shard_00000.off.npy",
        "shard_00000.parts.npy", "shard_00000.values.npy",
    ]  # fmt: skip
    common = ("train.steps=3", "run.log_every=1", "run.eval_every=0", "data.val_batches=16",
              "train.threads=1")  # fmt: skip
    train(_cfg(tmp_path / "live", tokenizer_cache, *common))
    train(_cfg(tmp_path / "tok", tokenizer_cache, *common, f"data.path={shards}"))
    live, tok = _rows(tmp_path / "live"), _rows(tmp_path / "tok")
    assert len(live) == 4 and live == tok
    with pytest.raises(ValueError, match="patch_size=2"):
        train(_cfg(tmp_path / "k4", tokenizer_cache, *common, f"data.path={shards}",
                   "model.patch_size=4"))  # fmt: skip


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


def test_flow_run_trains_generates_and_refuses_a_resume_with_another_image_loss(
    tmp_path, tokenizer_cache, capsys
):
    import dataclasses

    from sparsefusion.cli.main import main
    from sparsefusion.runs.folder import check_resume_config

    run = tmp_path / "run"
    common = ("train.steps=2", "run.save_every=2", "run.eval_every=2", "run.log_every=1")
    last = train(_cfg(run, tokenizer_cache, *common, "objective.image_loss=flow"))
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss/image"] != rows[1]["loss/image"]
    assert all(0 < r["loss/image"] < float("inf") for r in rows) and last["val"]["loss/image"] > 0
    out = tmp_path / "samples"
    args = ["generate", str(run), "--prompt", "a red circle", "--mode", "text_to_image",
            "--diffusion-steps", "3"]  # fmt: skip
    assert main([*args, "--cfg", "2", "--out", str(out)]) == 0  # --sampler auto: euler
    assert len(list(out.glob("sample_*_image_0.png"))) == 1
    capsys.readouterr()
    assert main([*args, "--sampler", "ddim", "--out", str(tmp_path / "ddim")]) == 2
    err = capsys.readouterr().err
    assert "sampler 'ddim' does not fit objective.image_loss=flow" in err, err
    with pytest.raises(ValueError, match=r"objective\.image_loss=flow \(now objective\.image"):
        train(_cfg(run, tokenizer_cache, *common, "objective.image_loss=ddpm", "train.steps=3"))
    cfg = _cfg(run, tokenizer_cache, *common, "objective.image_loss=flow")
    cfg.objective = dataclasses.replace(cfg.objective, name="ar")
    with pytest.raises(ValueError, match=r"objective\.name=transfusion \(now objective\.name=ar"):
        check_resume_config(run, cfg)

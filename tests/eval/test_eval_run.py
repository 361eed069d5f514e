"""`sparsefusion eval` on a tiny trained run: a complete, reproducible row; causal perplexity
with and without auxiliary routers; generation metrics through the generation API."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from sparsefusion.config import merge
from sparsefusion.eval.run_eval import EvalConfig, evaluate_at_checkpoint, evaluate_run
from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.aux_train import AuxTrainConfig, train_aux
from sparsefusion.train.trainer import train

METRICS = ("loss/batch", "ppl/batch/text", "ppl/batch/image", "fid_sf", "clip_sf", "cider")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_evaluator):
    root = tmp_path_factory.mktemp("evalrun")
    cfg = resolve_config(
        "moma-4t4i-mod-debug",
        [
            f"run.dir={root / 'run'}",
            f"tokenizer.cache_dir={root / 'tok'}",
            "run.progress=log",
            "run.eval_every=0",
            "data.val_batches=1",
            "train.steps=2",
        ],
    )
    train(cfg)
    return root / "run", tiny_evaluator


def _cfg(ev: dict, **kw) -> EvalConfig:
    return merge(
        EvalConfig(num_samples=8, val_batches=1, evaluator=merge(EvalConfig().evaluator, ev)), kw
    )


def _numbers(row):
    return {k: v for k, v in row.items() if isinstance(v, float) and not k.endswith("seconds")}


def test_eval_row_without_generator_or_aux_routers(run, monkeypatch):
    run_dir, ev = run
    monkeypatch.setitem(sys.modules, "sparsefusion.generate", None)  # not importable
    row, out = evaluate_run(run_dir, _cfg(ev))
    assert row["step"] == 2 and row["size"] == "full" and row["flops"] > 0
    assert row["elapsed_s"] > 0 and row["tokens"] > 0
    for key in ("loss/batch", "loss/batch/text", "loss/batch/image", "ppl/batch"):
        assert row[key] > 0, key
    assert "loss/causal" not in row
    assert "train-aux" in row["skipped"]["ppl/causal"]
    for key in ("fid_sf", "clip_sf", "cider"):
        assert "generation is not available" in row["skipped"][key]
    lines = (run_dir / "eval.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 2
    assert "ppl/batch" in (out / "summary.md").read_text()


# A stand-in for sparsefusion.generate (the real package lands separately): a "perfect" model
# returns the held-out image of a caption and the caption of an image; a "bad" one noise and
# a fixed wrong caption.
@dataclass
class _Seg:
    modality: str
    text: str | None = None
    image: object = None


@dataclass
class _Sample:
    segments: list = field(default_factory=list)


@dataclass
class _Req:
    mode: str
    prompt: str = ""
    image: object = None
    num_samples: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    seed: int = 0

    def validate(self, gen):
        if self.mode not in gen.modes:
            raise ValueError(f"mode: {self.mode}")


def _fake_generate_module(quality: str, lookup: dict):
    from PIL import Image

    class Generator:
        modes = ("text", "text_to_image", "image_to_text")

        @classmethod
        def from_run(cls, run_dir, checkpoint=None, device="cpu", diffusion=None, step="auto"):
            if quality == "unloadable":
                raise ValueError("needs auxiliary routers: run `sparsefusion train-aux`")
            return cls()

        def generate(self, reqs):
            out = []
            for r in reqs:
                g = torch.Generator().manual_seed(r.seed)
                if r.mode == "text_to_image":
                    if quality == "perfect":
                        im = lookup[r.prompt]
                    else:
                        arr = (torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()
                        im = Image.fromarray(arr)
                    out.append(_Sample([_Seg("image", image=im)]))
                else:
                    cap = lookup[r.image.tobytes()] if quality == "perfect" else "zebra zebra"
                    out.append(_Sample([_Seg("text", text=cap)]))
            return out

    mod = types.ModuleType("sparsefusion.generate")
    mod.Generator, mod.GenerationRequest = Generator, _Req
    mod.DiffusionSettings = lambda **kw: kw
    mod.write_samples = lambda samples, out: Path(out).mkdir(parents=True, exist_ok=True)
    return mod


@pytest.fixture()
def lookup():
    from sparsefusion.data.scenes import SceneCorpus
    from sparsefusion.eval.pairs import read_pairs

    pairs = read_pairs(SceneCorpus(split="val"), 140)
    table = {p.caption: p.image for p in pairs}
    table.update({p.image.tobytes(): p.caption for p in pairs})
    return table


def test_generation_metrics_perfect_vs_bad_and_reproducible(run, monkeypatch, lookup):
    run_dir, ev = run
    monkeypatch.setitem(
        sys.modules, "sparsefusion.generate", _fake_generate_module("perfect", lookup)
    )
    good, out = evaluate_run(run_dir, _cfg(ev))
    assert good["fid_sf"] == pytest.approx(0.0, abs=1e-3)  # the real images themselves
    assert good["clip_sf"] == pytest.approx(good["clip_sf_real"])
    assert good["clip_sf_real"] > good["clip_sf_shuffled"]
    assert good["cider"] > 5.0 and good["fid_sf_real"] > 0
    assert "retrieval_i2t_top1" in good["evaluators"]["heldout"]
    assert (out / "text_to_image.png").is_file() and (out / "image_to_text.jsonl").is_file()
    again, same = evaluate_run(run_dir, _cfg(ev))
    assert _numbers(again) == _numbers(good) and same == out
    _, guided = evaluate_run(run_dir, _cfg(ev, cfg_scale=3.0, sampler="ddpm"))
    assert guided.name == f"{out.name}_cfg_scale-3.0_sampler-ddpm"  # its own samples
    assert (out / "text_to_image.png").is_file() and (guided / "text_to_image.png").is_file()
    assert all(k in good for k in METRICS)
    monkeypatch.setitem(sys.modules, "sparsefusion.generate", _fake_generate_module("bad", lookup))
    bad, _ = evaluate_run(run_dir, _cfg(ev))
    assert bad["fid_sf"] > 5 * max(good["fid_sf_real"], 1e-3)
    assert bad["clip_sf"] < good["clip_sf"] and bad["cider"] == 0.0


def test_small_eval_hook_writes_small_row(run, monkeypatch, lookup):
    run_dir, ev = run
    monkeypatch.setitem(
        sys.modules, "sparsefusion.generate", _fake_generate_module("perfect", lookup)
    )
    from sparsefusion.eval import run_eval

    monkeypatch.setattr(run_eval, "EvalConfig", lambda **kw: _cfg(ev, **kw))
    cfg = resolve_config("moma-4t4i-mod-debug", [f"run.dir={run_dir}"])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    row = evaluate_at_checkpoint(run_dir, None, cfg, 2)
    assert torch.equal(torch.rand(3), expected)  # the trainer's RNG stream is untouched
    assert row["size"] == "small" and row["t2i_samples"] == EvalConfig().small_num_samples
    assert "loss/batch" not in row and "fid_sf" in row


def test_causal_perplexity_with_aux_routers(run, monkeypatch):
    run_dir, ev = run
    monkeypatch.setitem(sys.modules, "sparsefusion.generate", None)
    train_aux(run_dir, AuxTrainConfig(steps=2, warmup_steps=1, log_every=1))
    row, _ = evaluate_run(run_dir, _cfg(ev))
    for key in ("loss/causal", "loss/causal/text", "ppl/causal/image", "gap/loss", "gap/loss/text"):
        assert key in row, key
    assert row["gap/loss"] == pytest.approx(row["loss/causal"] - row["loss/batch"])
    assert "ppl/causal" not in row["skipped"]


def test_eval_cli_errors(run, tmp_path, capsys):
    from sparsefusion.cli.main import main

    run_dir, _ = run
    bad = subprocess.run(
        [sys.executable, "-m", "sparsefusion", "eval", str(run_dir), "eval.num_sampels=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "num_samples" in bad.stderr
    assert main(["eval", str(run_dir), "--checkpoint", "7"]) == 1
    assert "step_00000007 does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "num_samples=3"]) == 2
    assert "only eval.* overrides" in capsys.readouterr().err


def test_run_without_images_evaluates_what_it_has(tmp_path, monkeypatch, tiny_evaluator):
    docs = tmp_path / "docs.jsonl"
    words = ["red", "green", "blue", "round", "square", "small", "large", "shape", "corner"]
    lines = [
        json.dumps([{"text": " ".join(words[(i + j) % len(words)] for j in range(12))}])
        for i in range(60)
    ]
    docs.write_text("\n".join(lines) + "\n")
    cfg = resolve_config(
        "mot-debug",
        [
            f"run.dir={tmp_path / 'run'}",
            f"data.path={docs}",
            f"tokenizer.cache_dir={tmp_path / 'tok'}",
            "run.progress=log",
            "run.eval_every=0",
            "data.val_batches=1",
            "data.val_fraction=0.2",
            "train.steps=1",
        ],
    )
    train(cfg)
    monkeypatch.setitem(sys.modules, "sparsefusion.generate", _fake_generate_module("bad", {}))
    row, _ = evaluate_run(tmp_path / "run", _cfg(tiny_evaluator))
    assert row["ppl/batch/text"] > 0 and "ppl/batch/image" not in row
    for key in ("fid_sf", "clip_sf", "cider"):
        assert key not in row and "caption-image pairs" in row["skipped"][key], row["skipped"]
    assert "causal routing = batch routing" in row["notes"]["causal"]  # MoT routes per token
    assert row["loss/causal"] == row["loss/batch"]


def test_damaged_checkpoint_is_a_clear_error(run, tmp_path, capsys):
    import shutil

    from sparsefusion.cli.main import main

    run_dir, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    weights = copy / "checkpoints" / "step_00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["eval", str(copy), "--checkpoint", "2"]) == 1
    assert "step_00000002 is damaged" in capsys.readouterr().err
    assert main(["eval", str(copy)]) == 1
    assert "none can be resumed" in capsys.readouterr().err


def test_a_run_that_cannot_generate_says_why(run, monkeypatch):
    run_dir, ev = run
    monkeypatch.setitem(
        sys.modules, "sparsefusion.generate", _fake_generate_module("unloadable", {})
    )
    row, _ = evaluate_run(run_dir, _cfg(ev))
    for key in ("fid_sf", "clip_sf", "cider"):
        assert "cannot generate: needs auxiliary routers" in row["skipped"][key]
    assert row["loss/batch"] > 0 and "evaluators" not in row  # no evaluator work for nothing


def test_real_generator_complete_reproducible_row(tmp_path, tiny_evaluator):
    pytest.importorskip("sparsefusion.generate")
    cfg = resolve_config(
        "mot-debug",
        [
            f"run.dir={tmp_path / 'run'}",
            f"tokenizer.cache_dir={tmp_path / 'tok'}",
            "run.progress=log",
            "run.eval_every=0",
            "data.val_batches=1",
            "train.steps=2",
        ],
    )
    train(cfg)
    ecfg = merge(_cfg(tiny_evaluator), {"num_samples": 4, "max_new_tokens": 96})
    row, out = evaluate_run(tmp_path / "run", ecfg)
    keys = ("fid_sf", "clip_sf", "cider", "fid_sf_real", "fid_sf_tokenizer", "clip_sf_tokenizer")
    for key in (*keys, "ppl/batch/text", "ppl/causal/image"):
        assert key in row and math.isfinite(row[key]), (key, row.get("skipped"))
    assert row["t2i_samples"] == 4 and row["i2t_samples"] == 4
    assert (out / "text_to_image.png").is_file()
    again, _ = evaluate_run(tmp_path / "run", ecfg)
    assert _numbers(again) == _numbers(row)
    other, _ = evaluate_run(tmp_path / "run", merge(ecfg, {"seed": 1}))
    assert _numbers(other) != _numbers(row)  # the seed drives the samples


@pytest.mark.parametrize("image_loss", ["ddpm", "flow"])
def test_transfusion_row_with_diffusion_settings_and_the_vae_ceiling(
    tmp_path, tiny_evaluator, image_loss
):
    pytest.importorskip("diffusers")
    cfg = resolve_config(
        "tf-mot-debug",
        [
            f"run.dir={tmp_path / 'run'}",
            f"tokenizer.cache_dir={tmp_path / 'tok'}",
            f"objective.image_loss={image_loss}",
            "run.progress=log",
            "run.eval_every=0",
            "data.val_batches=1",
            "train.steps=2",
        ],
    )
    train(cfg)
    ecfg = merge(_cfg(tiny_evaluator), {"num_samples": 4, "max_new_tokens": 24})
    row, _ = evaluate_run(tmp_path / "run", merge(ecfg, {"diffusion_steps": 2}))
    for key in ("fid_sf", "clip_sf", "fid_sf_tokenizer", "clip_sf_tokenizer", "fid_sf_real"):
        assert key in row and math.isfinite(row[key]), (key, row.get("skipped"))
    # The VAE round trip is the same whatever the model draws; more passes change the samples.
    assert row["sampling"]["diffusion_steps"] == 2 and row["sampling"]["sampler"] == "auto"
    more, _ = evaluate_run(tmp_path / "run", merge(ecfg, {"diffusion_steps": 3}))
    assert more["fid_sf_tokenizer"] == row["fid_sf_tokenizer"]
    assert more["fid_sf"] != row["fid_sf"]
    # Guidance draws other images and leaves the captions (image -> text) as they were.
    guided, _ = evaluate_run(
        tmp_path / "run", merge(ecfg, {"diffusion_steps": 2, "cfg_scale": 3.0})
    )
    assert guided["fid_sf"] != row["fid_sf"] and guided["cider"] == row["cider"]
    wrong = "ddim" if image_loss == "flow" else "euler"
    with pytest.raises(ValueError, match="image_loss"):
        evaluate_run(tmp_path / "run", merge(ecfg, {"sampler": wrong}))


@pytest.mark.parametrize(
    ("kw", "key"),
    [({"sampler": "heun"}, "eval.sampler"), ({"diffusion_steps": 0}, "eval.diffusion_steps")],
)
def test_bad_diffusion_settings_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        EvalConfig(**kw)

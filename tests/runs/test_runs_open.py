"""The run layer: every opener reads the trainer's data, its tokenizer and its lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sparsefusion.eval.run_eval import EvalConfig, evaluate_run
from sparsefusion.generate.run import load_run
from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.runs.tokenizer import tokenizer_dir
from sparsefusion.runtime import run_lock
from sparsefusion.train.aux_train import AuxTrainConfig, train_aux
from sparsefusion.train.trainer import train

TINY_TOK = ("tokenizer.image.held_out=2", "tokenizer.image.batch_size=4",
            "tokenizer.image.train_steps=5")  # fmt: skip


def _cfg(run: Path, cache: str, *extra: str):
    return resolve_config(
        "moma-4t4i-debug",
        [f"run.dir={run}", f"tokenizer.cache_dir={cache}", "run.progress=log",
         "run.eval_every=0", "train.steps=3", "data.val_batches=2", "train.threads=1", *extra],
    )  # fmt: skip


def _final_val(run: Path) -> dict:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "val"][-1]


def test_train_aux_and_eval_validate_on_the_trainers_batches(tmp_path, tokenizer_cache):
    # Scene documents are longer than 110 tokens about half of the time: the trainer skips them,
    # and so must every other reader of the run's data (train-aux and eval used not to).
    run = tmp_path / "run"
    train(_cfg(run, tokenizer_cache, "data.max_doc_tokens=110"))
    val = _final_val(run)
    row = train_aux(run, AuxTrainConfig(steps=2, device="cpu", threads=1))
    assert row["batch/loss"] == val["loss"]
    ev, _ = evaluate_run(run, EvalConfig(generate=False, device="cpu", samples=False))
    assert ev["loss/batch"] == val["loss"]
    for modality in ("text", "image"):
        assert ev[f"loss/batch/{modality}"] == val[f"loss/{modality}"]


def _clean_jsonl(root: Path) -> Path:
    (root / "img").mkdir(parents=True)
    docs = []
    for i, colour in enumerate(["red", "green", "blue", "yellow", "white", "black"]):
        Image.new("RGB", (32, 32), colour).save(root / "img" / f"{i}.png")
        docs += [[{"text": f"A {colour} square."}, {"image": f"img/{i}.png"}],
                 [{"image": f"img/{i}.png"}, {"text": f"It is {colour}."}]]  # fmt: skip
    path = root / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs * 3) + "\n")
    return path


def test_strict_data_applies_to_train_aux_and_eval(tmp_path, tokenizer_cache):
    data = _clean_jsonl(tmp_path / "data")
    run = tmp_path / "run"
    strict = (f"data.path={data}", "data.strict=true", "data.val_fraction=0.25", *TINY_TOK)
    train(_cfg(run, tokenizer_cache, *strict))
    for png in (tmp_path / "data" / "img").iterdir():  # every image is unreadable now
        png.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"docs.jsonl:\d+"):
        evaluate_run(run, EvalConfig(generate=False, device="cpu", samples=False))
    with pytest.raises(ValueError, match=r"docs.jsonl:\d+"):
        train_aux(run, AuxTrainConfig(steps=2, device="cpu", threads=1))


def test_a_run_opens_from_any_directory_without_training_a_tokenizer(
    tmp_path, tokenizer_cache, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a relative tokenizer cache, as in the README's demo
    train(_cfg(Path("run"), ".cache/tok", "train.steps=2"))
    assert tokenizer_dir(tmp_path / "run").is_dir()
    train_aux(tmp_path / "run", AuxTrainConfig(steps=1, device="cpu", threads=1))

    def no_training(*args, **kwargs):
        raise AssertionError("opening a run trained a tokenizer")

    monkeypatch.setattr("sparsefusion.tokenizers.build.train_tokenizer", no_training)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the relative cache is not here
    loaded = load_run(tmp_path / "run", device="cpu")
    assert loaded.tokenizer.vocab.padded_size() == loaded.config.model.vocab_size
    ev, _ = evaluate_run(tmp_path / "run", EvalConfig(generate=False, device="cpu", samples=False))
    assert ev["loss/batch"] == _final_val(tmp_path / "run")["loss"]


def test_train_aux_takes_the_run_lock(tmp_path, tokenizer_cache):
    run = tmp_path / "run"
    train(_cfg(run, tokenizer_cache, "train.steps=2"))
    fd = run_lock.acquire(run)
    try:
        with pytest.raises(run_lock.RunLocked):
            train_aux(run, AuxTrainConfig(steps=1, device="cpu", threads=1))
    finally:
        run_lock.release(fd)

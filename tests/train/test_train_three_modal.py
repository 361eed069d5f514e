"""Three-modality (text, image, speech) MoT trains end to end on a user JSONL with bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.trainer import train

TINY_TOK = (
    "tokenizer.speech.num_units=16",
    "tokenizer.speech.kmeans_iters=5",
    "tokenizer.image.held_out=2",
    "tokenizer.image.batch_size=4",
    "tokenizer.image.train_steps=5",
)


def _with_clean_tail(user_jsonl: Path) -> Path:
    """The fixture plus three good lines at the end, which form the val split."""
    tail = [
        [{"text": "A red square and a low tone."}, {"image": "img/red.png"},
         {"audio": "wav/low.wav"}],
        [{"audio": "wav/high.wav"}, {"text": "A high tone."}],
        [{"image": "img/blue.png"}, {"text": "A blue square."}],
    ]  # fmt: skip
    with open(user_jsonl, "a") as f:
        f.write("\n".join(json.dumps(t) for t in tail) + "\n")
    return user_jsonl


def test_three_modality_mot_trains_and_counts_bad_input(tmp_path, user_jsonl, tokenizer_cache):
    path = _with_clean_tail(user_jsonl)
    cfg = resolve_config(
        "mot-debug",
        [
            f"run.dir={tmp_path / 'run'}",
            f"tokenizer.cache_dir={tokenizer_cache}",
            f"data.path={path}",
            "data.val_fraction=0.2",
            "data.val_batches=1",
            "model.modalities=[text,image,speech]",
            "train.steps=4",
            "run.log_every=2",
            "run.progress=log",
            *TINY_TOK,
        ],
    )
    assert cfg.model.num_towers == 3
    last = train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "split" not in r]
    assert {"loss/text", "loss/image", "loss/speech"} <= set(rows[-1])
    assert rows[-1]["data/skipped"] >= 7 and rows[-1]["data/skipped/bad_json"] >= 1
    assert last["val"]["loss"] > 0


def test_modalities_must_match_the_tokenizer(tmp_path, user_jsonl, tokenizer_cache):
    cfg = resolve_config(
        "mot-debug",
        [f"run.dir={tmp_path / 'r'}", f"tokenizer.cache_dir={tokenizer_cache}",
         f"data.path={_with_clean_tail(user_jsonl)}", "data.val_fraction=0.2", *TINY_TOK],
    )  # fmt: skip
    with pytest.raises(ValueError, match="model.modalities"):
        train(cfg)


def test_strict_data_fails_fast(tmp_path, user_jsonl, tokenizer_cache):
    cfg = resolve_config(
        "mot-debug",
        [f"run.dir={tmp_path / 'r'}", f"tokenizer.cache_dir={tokenizer_cache}",
         f"data.path={_with_clean_tail(user_jsonl)}", "data.val_fraction=0.2", "data.strict=true",
         "model.modalities=[text,image,speech]", *TINY_TOK],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"docs.jsonl:\d+"):
        train(cfg)

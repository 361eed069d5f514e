"""``sparsefusion data preview`` and ``sparsefusion tokenizer train|inspect`` on a user JSONL."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sparsefusion.cli.main import main

TINY = [
    "--preset",
    "mot-debug",
    "tokenizer.speech.num_units=16",
    "tokenizer.speech.kmeans_iters=5",
    "tokenizer.speech.griffin_lim_iters=4",
    "tokenizer.image.held_out=2",
    "tokenizer.image.batch_size=4",
    "tokenizer.image.train_steps=5",
    "data.val_fraction=0",
]


def test_data_preview_writes_grid_wavs_and_stats(tmp_path, user_jsonl, capsys):
    out = tmp_path / "preview"
    cache = f"tokenizer.cache_dir={tmp_path / 'cache'}"
    assert main(["data", "preview", str(user_jsonl), "--out", str(out), cache, *TINY]) == 0
    printed = capsys.readouterr().out
    stats = json.loads(printed[printed.index("{\n") : printed.rindex("}") + 1])
    assert stats["documents"] == 6 and sum(stats["skipped"].values()) == 7
    assert stats["skipped"]["corrupt_image"] == 2
    assert stats["tokens"]["speech"] > 0 and stats["segments"]["image"] == 4
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 0 and (out / "speech_0.wav").is_file()
    assert (out / "speech_1_units.wav").is_file()


def test_tokenizer_train_inspect_and_use(tmp_path, user_jsonl, capsys):
    tok_dir = tmp_path / "tok"
    assert main(["tokenizer", "train", str(user_jsonl), "--out", str(tok_dir), *TINY]) == 0
    assert (tok_dir / "speech_units.safetensors").is_file()
    assert main(["tokenizer", "inspect", str(tok_dir), "--text", "a red square"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "speech" in out and "25 units per second" in out
    # A config can point at the trained files (tokenizer.path): the preview then uses them.
    args = ["data", "preview", str(user_jsonl), "--out", str(tmp_path / "p"), *TINY]
    assert main([*args, f"tokenizer.path={tok_dir}"]) == 0
    assert "(tokenizer.path)" in capsys.readouterr().out
    assert main(["data", "preview", "no_such_source_or_path"]) == 2


def test_data_preview_bad_tokenizer_or_out_is_a_clear_error(tmp_path, user_jsonl, capsys):
    not_tok = tmp_path / "not_a_tokenizer"
    not_tok.mkdir()
    (not_tok / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    args = ["data", "preview", str(user_jsonl), "--out", str(out), *TINY]
    assert main([*args, "--tokenizer", str(not_tok)]) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer {not_tok}: not a tokenizer directory" in err
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    args = ["data", "preview", str(user_jsonl), "--out", str(taken), *TINY]
    assert main(args) == 2
    assert f"--out {taken}: exists and is not a folder" in capsys.readouterr().err
    assert taken.read_text() == "keep me"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["data", "tokenize", "scenes", "--out", "OUT", "--docs", "-5"], "--docs must be >= 0"),
        (["data", "tokenize", "scenes", "--out", "OUT", "--val-docs", "-1"], "--val-docs"),
        (["data", "tokenize", "scenes", "--out", "OUT", "--docs-per-shard", "0"], "shard must"),
        (["data", "preview", "scenes", "--out", "OUT", "--docs", "-3"], "--docs must be >= 1"),
    ],
)
def test_negative_counts_are_refused_before_any_work(tmp_path, capsys, argv, flag):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""Hostile records are counted skips naming file and line, with bounded memory and time; 16-bit
PNGs keep their tones; empty data is a clear error and never leaves a tokenizer in the cache."""

from __future__ import annotations

import json
import resource
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from hostile import plant, wav_with_rate
from PIL import Image

from sparsefusion.data.audio import decode_wav_bytes
from sparsefusion.data.issues import BadInput
from sparsefusion.data.jsonl_source import JsonlSource
from sparsefusion.data.limits import InputLimits
from sparsefusion.data.wds_source import WebDatasetSource
from sparsefusion.tokenizers.build import TokenizerConfig, load_or_train_tokenizer


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hostile_jsonl(folder: Path) -> tuple[Path, list[str]]:
    planted = plant(folder)
    Image.new("RGB", (8, 8), "red").save(folder / "red.png")
    good = json.dumps([{"text": "A red square."}, {"image": "red.png"}])
    lines = [good, *(line for line, _ in planted), good]
    path = folder / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, [reason for _, reason in planted]


def test_each_hostile_record_is_a_counted_skip_naming_file_and_line(tmp_path):
    path, reasons = _hostile_jsonl(tmp_path)
    src = JsonlSource(str(path), val_fraction=0.0)
    assert src.document(0).meta["where"] == "docs.jsonl:1"
    before, t0 = _peak_mb(), time.monotonic()
    for k, reason in enumerate(reasons, start=1):
        with pytest.raises(BadInput) as e:
            src.document(k)
        assert e.value.reason == reason, e.value
        assert e.value.where.startswith(f"docs.jsonl:{k + 1}")
    assert time.monotonic() - t0 < 20  # the FIFO is never opened for reading
    assert _peak_mb() - before < 300, "a hostile record cost too much memory"
    assert src.document(len(reasons) + 1).modalities() == ["text", "image"]


def test_size_checks_come_before_decoding(tmp_path):
    """A 30 MB single-line document is refused before it is parsed; limits are config keys."""
    path = tmp_path / "long.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps([{"text": "a" * 30_000_000}]) + "\n")
        f.write(json.dumps([{"text": "short"}]) + "\n")
    before = _peak_mb()
    src = JsonlSource(str(path), val_fraction=0.0)
    with pytest.raises(BadInput, match="max_doc_bytes") as e:
        src.document(0)
    assert e.value.reason == "oversize_document" and e.value.where == "long.jsonl:1"
    assert src.document(1).segments[0].payload == "short"
    assert _peak_mb() - before < 25, "the long line was read into memory"
    wav = wav_with_rate(16000, num_bytes=64000)  # 2 s
    assert decode_wav_bytes(wav, "w", max_seconds=3).numel() == 32000
    with pytest.raises(BadInput, match="max_audio_seconds") as e:
        decode_wav_bytes(wav, "w", max_seconds=1)
    assert e.value.reason == "oversize_audio"
    small = JsonlSource(str(path), val_fraction=0.0, limits=InputLimits(max_file_bytes=10))
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(BadInput, match="max_file_bytes"):
        small._segment({"image": "x.png"}, "long.jsonl:9")


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    values = np.full((8, 8), 32768, dtype=np.uint16)
    values[:, 4:] = 65535
    Image.fromarray(values).save(tmp_path / "grey16.png")
    (tmp_path / "d.jsonl").write_text(json.dumps([{"image": "grey16.png"}]) + "\n")
    image = JsonlSource(str(tmp_path / "d.jsonl"), image_size=8).document(0).segments[0].payload
    assert image.getpixel((1, 1)) == (128, 128, 128)
    assert image.getpixel((6, 6)) == (255, 255, 255)


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "blank"])
def test_empty_jsonl_is_a_clear_error_naming_the_path(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}.*no document"):
        JsonlSource(str(path))


def test_shard_folder_without_a_real_tar_is_a_clear_error(tmp_path):
    (tmp_path / "only.tar").write_text("this is not a tar archive")
    with pytest.raises(ValueError, match=f"{tmp_path}.*only.tar") as e:
        WebDatasetSource(str(tmp_path))
    assert not isinstance(e.value, IndexError)


def test_oversize_shard_members_are_skipped_before_reading(tmp_path):
    import io

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (("0.txt", b"x" * 5000), ("1.txt", b"fine")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = WebDatasetSource(str(tmp_path), val_fraction=0.0, limits=InputLimits(max_doc_bytes=100))
    with pytest.raises(BadInput, match="max_doc_bytes") as e:
        src.document(0)
    assert e.value.where.startswith("s.tar:0")
    assert src.document(1).segments[0].payload == "fine"


def test_no_usable_document_never_caches_a_tokenizer(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json\n[]\n" + json.dumps([{"image": "missing.png"}]) + "\n")
    cache = tmp_path / "cache"
    cfg = TokenizerConfig(cache_dir=str(cache), text_vocab_size=260)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable document"):
        load_or_train_tokenizer(cfg, JsonlSource(str(path), val_fraction=0.0), progress=False)
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")]


def test_planted_records_train_to_the_end_each_counted(tmp_path, user_jsonl, tokenizer_cache):
    from sparsefusion.runs.folder import read_metrics
    from sparsefusion.runs.presets import resolve_config
    from sparsefusion.train.trainer import train

    planted = plant(user_jsonl.parent)
    tail = [
        [{"text": "A red square and a low tone."}, {"image": "img/red.png"},
         {"audio": "wav/low.wav"}],
        [{"audio": "wav/high.wav"}, {"text": "A high tone."}],
        [{"image": "img/blue.png"}, {"text": "A blue square."}],
    ]  # fmt: skip
    with open(user_jsonl, "a") as f:
        f.write("\n".join([line for line, _ in planted] + [json.dumps(t) for t in tail]) + "\n")
    tiny_tok = ["tokenizer.speech.num_units=16", "tokenizer.speech.kmeans_iters=5",
                "tokenizer.image.held_out=2", "tokenizer.image.batch_size=4",
                "tokenizer.image.train_steps=5"]  # fmt: skip
    run = tmp_path / "run"
    cfg = resolve_config(
        "mot-debug",
        [f"run.dir={run}", f"tokenizer.cache_dir={tokenizer_cache}", f"data.path={user_jsonl}",
         "data.val_fraction=0.2", "data.val_batches=1", "model.modalities=[text,image,speech]",
         "train.steps=3", "run.log_every=3", "run.progress=log", "train.threads=1", *tiny_tok],
    )  # fmt: skip
    train(cfg)
    row = [r for r in read_metrics(run / "metrics.jsonl") if "split" not in r][-1]
    assert row["step"] == 3
    for reason in {r for _, r in planted}:
        assert row.get(f"data/skipped/{reason}", 0) >= 1, reason
    log = (run / "train.log").read_text()
    assert "docs.jsonl:" in log and "bomb.png" in log and "/dev/zero" in log

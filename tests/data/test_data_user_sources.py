"""Users' data: JSONL and WebDataset sources, bad input skipped and counted (or strict)."""

from __future__ import annotations

import io
import logging
import tarfile

import pytest
import torch
from PIL import Image

from sparsefusion.data.issues import BadInput
from sparsefusion.data.jsonl_source import JsonlSource
from sparsefusion.data.loader import PackedLoader
from sparsefusion.data.sources import DataConfig, build_source
from sparsefusion.data.wds_source import WebDatasetSource

BAD = {
    8: "corrupt_image",
    9: "corrupt_image",
    10: "bad_json",
    11: "missing_file",
    12: "empty_document",
    13: "unknown_segment",
    14: "corrupt_audio",
}


class CountingTokenizer:
    """One id per segment (text 0, image 1, speech 2) between BOS/EOS; enough for packing."""

    def encode_documents(self, docs):
        out = []
        for d in docs:
            mods = [0] + [{"text": 0, "image": 1, "speech": 2}[s.modality] for s in d.segments]
            n = 200 if any(s.payload == "LONG" for s in d.segments) else 0
            out.append(([1] * (len(mods) + 1 + n), mods + [0] * (1 + n)))
        return out


def test_jsonl_reads_documents_with_relative_paths(user_jsonl):
    src = JsonlSource(str(user_jsonl), val_fraction=0.0, image_size=16)
    assert len(src) == 13 and src.modalities == ["text", "image", "speech"]
    doc = src.document(0)
    assert doc.modalities() == ["text", "image"] and doc.meta["where"] == "docs.jsonl:1"
    assert doc.segments[1].payload.size == (16, 16)
    assert doc.segments[1].payload.getpixel((8, 8)) == (255, 0, 0)
    assert src.document(1).meta["id"] == "g"  # object lines keep their other keys
    speech = src.document(2)  # line 4 (line 3 is blank)
    assert speech.meta["where"] == "docs.jsonl:4" and speech.modalities() == ["text", "speech"]
    wave = speech.segments[1].payload
    assert wave.dtype == torch.float32 and abs(wave.numel() - 2 * 0.6 * 16000) < 2
    with pytest.raises(IndexError):
        src.document(13)


@pytest.mark.parametrize("line,reason", sorted(BAD.items()))
def test_jsonl_bad_lines_raise_with_file_and_line(user_jsonl, line, reason):
    src = JsonlSource(str(user_jsonl), val_fraction=0.0)
    with pytest.raises(BadInput) as e:
        src.document(line - 2)  # one blank line before
    assert e.value.reason == reason and e.value.where.startswith(f"docs.jsonl:{line}")


def test_loader_skips_counts_and_logs_bad_input(user_jsonl, caplog):
    src = JsonlSource(str(user_jsonl), val_fraction=0.0)
    loader = PackedLoader(src, CountingTokenizer(), seq_len=8, batch_size=2, docs_per_chunk=13)
    with caplog.at_level(logging.WARNING, logger="sparsefusion"):
        loader.next_batch()
    stats = loader.loader_stats()
    assert stats["data/skipped"] == 7
    assert stats["data/skipped/corrupt_image"] == 2 and stats["data/skipped/bad_json"] == 1
    assert "docs.jsonl:11" in caplog.text and "missing_file" in caplog.text
    # The counts travel with the state, so a resumed loader keeps them.
    other = PackedLoader(src, CountingTokenizer(), seq_len=8, batch_size=2, docs_per_chunk=13)
    other.load_state_dict(loader.state_dict())
    assert other.issue_metrics() == loader.issue_metrics()


def test_strict_mode_fails_fast(user_jsonl):
    src = JsonlSource(str(user_jsonl), val_fraction=0.0)
    loader = PackedLoader(src, CountingTokenizer(), seq_len=8, batch_size=2, strict=True)
    with pytest.raises(BadInput, match="docs.jsonl:8"):
        loader.next_batch()


def test_oversize_documents_are_skipped(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text('[{"text": "LONG"}]\n[{"text": "short"}]\n')
    src = JsonlSource(str(path), val_fraction=0.0)
    loader = PackedLoader(
        src, CountingTokenizer(), seq_len=4, batch_size=1, docs_per_chunk=2, max_doc_tokens=50
    )
    loader.next_batch()
    assert loader.issue_metrics()["data/skipped/oversize_document"] >= 1


def test_data_path_config_and_val_split(user_jsonl):
    cfg = DataConfig(path=str(user_jsonl), val_fraction=0.25)
    assert cfg.source == "path"
    train, val = (build_source(cfg, seed=0, split=s) for s in ("train", "val"))
    assert len(train) + len(val) == 13 and len(val) == 3
    with pytest.raises(BadInput, match="docs.jsonl:12"):  # val holds the last three lines
        val.document(0)
    with pytest.raises(ValueError, match="data.path"):
        build_source(DataConfig(path=str(user_jsonl.parent / "none.jsonl")), seed=0, split="train")


def _png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    _write_shard(
        tmp_path / "shard-000.tar",
        {"a.png": _png("red"), "a.txt": b"a red square", "b.png": _png("blue"), "b.txt": b"blue"},
    )
    _write_shard(tmp_path / "shard-001.tar", {"c.png": b"garbage", "c.txt": b"broken"})
    src = build_source(DataConfig(path=str(tmp_path), val_fraction=0.0), seed=0, split="train")
    assert isinstance(src, WebDatasetSource) and len(src) == 3
    doc = src.document(0)
    assert sorted(doc.modalities()) == ["image", "text"]
    assert doc.meta["captions"] == ["a red square"]
    assert doc.meta["where"] == "shard-000.tar:a"
    orders = {tuple(src.document(i).modalities()) for i in range(2)}
    assert orders <= {("text", "image"), ("image", "text")}
    with pytest.raises(BadInput, match="shard-001.tar:c.png") as e:
        src.document(2)
    assert e.value.reason == "corrupt_image"

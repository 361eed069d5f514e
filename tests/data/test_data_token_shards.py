"""Token shards: `data tokenize` output trains exactly like the on-the-fly pipeline; a killed
tokenize resumes to identical files; workers write disjoint shards; bad records stay counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsefusion.cli.main import main as cli_main
from sparsefusion.data.issues import BadInput
from sparsefusion.data.token_shards import TokenShardSource
from sparsefusion.data.tokenize import FAULT_ENV
from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.tokenizers.multimodal import MultimodalTokenizer
from sparsefusion.train.trainer import train

TOKENIZE = ["--docs", "40", "--val-docs", "8", "--docs-per-shard", "16", "--quiet"]


def _tokenize(out: Path, cache: str, *extra: str, target: str = "scenes") -> int:
    argv = ["data", "tokenize", target, "--out", str(out), "--preset", "mot-debug"]
    return cli_main([*argv, *TOKENIZE, *extra, f"tokenizer.cache_dir={cache}"])


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.parent.name in ("train", "val")
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer_cache) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "scenes"
    assert _tokenize(out, tokenizer_cache) == 0
    return out


def test_manifest_counts_and_memory_maps(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    train_info = manifest["splits"]["train"]
    assert train_info["documents"] == 40 and len(train_info["shards"]) == 3
    per_mod = train_info["tokens_per_modality"]
    assert per_mod["text"] > 0 and per_mod["image"] > 0
    assert sum(per_mod.values()) == train_info["tokens"]
    src = TokenShardSource(shards, split="train")
    doc = src.document(17)  # second shard
    assert doc.ids_N.base is not None  # a view into the memory map, not a copy
    assert (
        len(src) == 40
        and doc.encoded[0][0] == MultimodalTokenizer.load(src.tokenizer_dir()).vocab.bos_id
    )


def test_training_on_shards_equals_on_the_fly(shards, tmp_path, tokenizer_cache):
    common = [
        "run.progress=log", "run.log_every=1", "run.eval_every=0", "train.steps=4",
        "train.threads=1", f"tokenizer.cache_dir={tokenizer_cache}",
    ]  # fmt: skip
    train(resolve_config("mot-debug", [f"run.dir={tmp_path / 'live'}", *common]))
    train(resolve_config("mot-debug", [f"run.dir={tmp_path / 'tok'}", f"data.path={shards}",
                                       *common]))  # fmt: skip
    live = read_metrics(tmp_path / "live" / "metrics.jsonl")
    tok = read_metrics(tmp_path / "tok" / "metrics.jsonl")
    assert len(live) == len(tok) == 5  # 4 train rows + val
    for a, b in zip(live, tok, strict=True):
        assert a["loss"] == b["loss"] and a["tokens"] == b["tokens"]


def test_killed_tokenize_resumes_to_identical_shards(shards, tmp_path, tokenizer_cache):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sparsefusion", "data", "tokenize", "scenes", "--out", str(out),
           "--preset", "mot-debug", *TOKENIZE,
           f"tokenizer.cache_dir={tokenizer_cache}"]  # fmt: skip
    env = dict(os.environ, **{FAULT_ENV: "kill_after_shards=2"})
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="run the same command again"):
        TokenShardSource(out)
    (out / "train" / "shard_00002.ids.npy").write_bytes(b"partial")  # a half-written shard
    assert _tokenize(out, tokenizer_cache) == 0
    assert _files(out) == _files(shards)


def test_workers_write_disjoint_shards(shards, tmp_path, tokenizer_cache):
    out = tmp_path / "workers"
    assert _tokenize(out, tokenizer_cache, "--worker", "1", "--num-workers", "2") == 0
    written = sorted(p.name for p in (out / "train").glob("*.json"))
    assert written == ["shard_00001.json"] and not (out / "manifest.json").exists()
    assert _tokenize(out, tokenizer_cache, "--worker", "0", "--num-workers", "2") == 0
    assert _files(out) == _files(shards)
    assert json.loads((out / "manifest.json").read_text()) == json.loads(
        (shards / "manifest.json").read_text()
    )


def test_other_settings_are_refused(shards, tmp_path, tokenizer_cache, capsys):
    out = tmp_path / "plan"
    assert _tokenize(out, tokenizer_cache) == 0
    assert _tokenize(out, tokenizer_cache, "--docs-per-shard", "8") == 2
    assert "docs_per_shard differ" in capsys.readouterr().err


def test_bad_records_are_replayed(user_jsonl, tmp_path, tokenizer_cache):
    from sparsefusion.data.jsonl_source import JsonlSource

    out = tmp_path / "user"
    argv = ["data", "tokenize", str(user_jsonl), "--out", str(out), "--preset", "mot-debug",
            "--quiet", "data.val_fraction=0", f"tokenizer.cache_dir={tokenizer_cache}"]  # fmt: skip
    assert cli_main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["skipped"] == {
        "bad_json": 1, "corrupt_audio": 1, "corrupt_image": 2, "empty_document": 1,
        "missing_file": 1, "unknown_segment": 1,
    }  # fmt: skip
    live, tok = JsonlSource(str(user_jsonl), val_fraction=0), TokenShardSource(out)
    for i in range(len(live)):
        try:
            live.document(i)
        except BadInput as e:
            with pytest.raises(BadInput) as got:
                tok.document(i)
            assert (got.value.reason, got.value.where) == (e.reason, e.where)

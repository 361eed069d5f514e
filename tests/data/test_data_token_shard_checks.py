"""Token shards are not trusted (issue 28 item 8): a damaged folder is a one-line error naming
the file and field when opened or read, never an IndexError mid-training; plus a property test
over random mutations of a small folder."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from sparsefusion.cli.main import main as cli_main
from sparsefusion.data.issues import BadInput
from sparsefusion.data.token_shards import TokenShardSource

WORDS = ["a red square on a mat", "the blue circle is small", "green and yellow shapes"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer_cache) -> Path:
    folder = tmp_path_factory.mktemp("shardchecks")
    path = folder / "docs.jsonl"
    lines = [json.dumps([{"text": f"{WORDS[i % 3]} number {i}."}]) for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    out = folder / "tokens"
    argv = ["data", "tokenize", str(path), "--out", str(out), "--preset", "mot-debug", "--quiet",
            "--docs-per-shard", "8", "data.val_fraction=0.1", "tokenizer.text_vocab_size=260",
            f"tokenizer.cache_dir={tokenizer_cache}"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(argv) == 0
    return out


def _copy(shards: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "tokens"
    shutil.copytree(shards, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_array(path: Path, fn) -> None:
    arr = np.load(path).copy()
    np.save(path, fn(arr))


def _read_all(root: Path) -> None:
    for split in ("train", "val"):
        src = TokenShardSource(root, split=split)
        for i in range(len(src)):
            try:
                src.document(i)
            except BadInput:
                pass


def _more_docs(m):
    m["splits"]["train"]["documents"] += 100


def _set_id(value):
    def fn(a):
        a[3] = value
        return a

    return fn


MUTATIONS = {
    "manifest claims more documents": (
        lambda r: _edit_json(r / "manifest.json", _more_docs),
        "manifest.json: splits.train.documents: 136 but its shards hold 36",
    ),
    "id outside the vocabulary": (
        lambda r: _edit_array(r / "train/shard_00001.ids.npy", _set_id(10**6)),
        "shard_00001.ids.npy: document 0: id 1000000 outside the vocabulary",
    ),
    "negative id": (
        lambda r: _edit_array(r / "train/shard_00000.ids.npy", _set_id(-5)),
        "shard_00000.ids.npy: document 0: id -5 outside the vocabulary",
    ),
    "unknown modality id": (
        lambda r: _edit_array(r / "train/shard_00002.mod.npy", _set_id(7)),
        "shard_00002.mod.npy: document 0: modality index 7 outside",
    ),
    "shard json disagrees": (
        lambda r: _edit_json(r / "train/shard_00000.json", lambda m: m.update(num_docs=3)),
        "shard_00000.json: num_docs: 3 != manifest's 8",
    ),
    "float ids": (
        lambda r: _edit_array(r / "train/shard_00000.ids.npy", lambda a: a.astype(np.float32)),
        "shard_00000.ids.npy: dtype: expected integers",
    ),
    "truncated offsets": (
        lambda r: _edit_array(r / "train/shard_00000.off.npy", lambda a: a[:-2]),
        "shard_00000.off.npy: length",
    ),
    "decreasing offsets": (
        lambda r: _edit_array(r / "train/shard_00000.off.npy", _set_id(0)),
        "shard_00000.off.npy: offsets[2]: range [61, 0) is invalid",
    ),
    "bad skipped record": (
        lambda r: _edit_json(r / "train/shard_00000.json", lambda m: m.update(skipped={"0": 1})),
        "shard_00000.json: skipped.0",
    ),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_damaged_shards_name_file_and_field(shards, tmp_path, name):
    mutate, message = MUTATIONS[name]
    root = _copy(shards, tmp_path)
    mutate(root)
    with pytest.raises(ValueError) as e:
        _read_all(root)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_training_on_a_damaged_folder_is_a_one_line_error(shards, tmp_path, capsys):
    root = _copy(shards, tmp_path)
    _edit_array(root / "train/shard_00000.ids.npy", _set_id(10**6))
    argv = ["train", "mot-debug", f"run.dir={tmp_path / 'run'}", f"data.path={root}",
            "train.steps=2", "data.val_batches=1", "train.threads=1",
            "run.progress=log"]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "shard_00000.ids.npy: document 0: id 1000000 outside the vocabulary" in err
    assert "Traceback" not in err and "IndexError" not in err


def test_the_intact_folder_reads_cleanly(shards):
    _read_all(shards)


# ---- property: any byte-level or JSON mutation gives a clean ValueError or a clean read --------

FILES = ["manifest.json", "train/shard_00000.json", "train/shard_00000.ids.npy",
         "train/shard_00000.mod.npy", "train/shard_00000.off.npy"]  # fmt: skip


@seed(int(os.environ.get("SPARSEFUSION_FUZZ_SEED", "28")))
@settings(max_examples=int(os.environ.get("SPARSEFUSION_FUZZ_EXAMPLES", "40")), deadline=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(
    file=st.sampled_from(FILES),
    kind=st.sampled_from(["flip", "truncate", "json"]),
    pos=st.floats(0, 1),
    value=st.one_of(
        st.integers(-(2**40), 2**40),
        st.text(max_size=5),
        st.none(),
        st.booleans(),
        st.lists(st.integers(), max_size=3),
    ),  # fmt: skip
)
def test_any_mutation_is_a_named_error_or_a_clean_read(shards, tmp_path_factory, file, kind, pos,
                                                       value):  # fmt: skip
    root = _copy(shards, tmp_path_factory.mktemp("mut"))
    mutate_file(root / file, kind, pos, value)
    try:
        _read_all(root)
    except ValueError as e:
        assert "\n" not in str(e) and ("token shard" in str(e) or "manifest.json" in str(e))


def mutate_file(path: Path, kind: str, pos: float, value) -> None:
    """Flip a byte, truncate, or (JSON files) set a random key path to ``value``."""
    data = path.read_bytes()
    if kind == "json" and path.suffix == ".json":
        obj = json.loads(data)
        keys = _key_paths(obj)
        *parents, last = keys[int(pos * (len(keys) - 1))]
        target = obj
        for k in parents:
            target = target[k]
        target[last] = value
        path.write_text(json.dumps(obj))
    elif kind == "truncate":
        path.write_bytes(data[: int(pos * len(data))])
    else:
        i = min(len(data) - 1, int(pos * len(data)))
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])


def _key_paths(obj, prefix=()) -> list[tuple]:
    out = []
    if not isinstance(obj, (dict, list)):
        return out
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        out.append((*prefix, k))
        out += _key_paths(v, (*prefix, k))
    return out

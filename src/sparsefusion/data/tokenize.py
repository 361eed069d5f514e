"""Encode a source once into token shards (``sparsefusion data tokenize``; format in
``data/token_shards.py``).

Documents ``[k * docs_per_shard, (k + 1) * docs_per_shard)`` of a split form shard ``k``. Worker
``w`` of ``W`` (several processes, e.g. one per machine or ``torchrun``'s ranks) writes the
shards with ``k % W == w``, so workers never write the same file. A shard is written to
temporary files, renamed, and marked complete by its ``.json`` written last: a killed run leaves
at most one incomplete shard per worker, and running the same command again skips the complete
ones and rewrites the rest, giving the same bytes as an uninterrupted run (encoding is
deterministic). The worker that completes the last shard writes ``manifest.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sparsefusion.data.encoded import as_encoded
from sparsefusion.data.issues import BadInput
from sparsefusion.data.text import read_document
from sparsefusion.data.token_shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TOKENIZER_DIR,
    shard_stem,
    tokenizer_hash,
)

PLAN = "plan.json"
FAULT_ENV = "SPARSEFUSION_FAULTS"  # ``kill_after_shards=N``: SIGKILL itself (tests only)


def tokenize_to_dir(
    sources: dict[str, Any],
    tokenizer: Any,
    out: str | Path,
    *,
    num_docs: dict[str, int],
    docs_per_shard: int = 1024,
    docs_per_call: int = 64,
    worker: int = 0,
    num_workers: int = 1,
    strict: bool = False,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Write (or finish writing) this worker's shards of every split.

    Args:
        sources: split name -> document source.
        tokenizer: a ``MultimodalTokenizer`` (saved into ``out/tokenizer``).
        out: the output folder.
        num_docs: split name -> documents to encode (a finite source's length at most).
        docs_per_shard: documents per shard file.
        docs_per_call: documents per ``encode_documents`` call (images are encoded in batches).
        worker: this worker's index.
        num_workers: number of workers writing the folder.
        strict: raise on the first bad record instead of recording it as skipped.
        progress: show a progress bar.

    Returns:
        The manifest when this call completed the folder, else ``None`` (other workers' shards
        are still missing).

    Raises:
        ValueError: for bad arguments, or a folder started with other settings (naming them).
    """
    if docs_per_shard < 1 or docs_per_call < 1 or not 0 <= worker < num_workers:
        raise ValueError(
            f"need docs_per_shard, docs_per_call >= 1 and 0 <= worker < num_workers, got "
            f"{docs_per_shard}, {docs_per_call}, {worker}, {num_workers}"
        )
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(tokenizer, root)
    plan = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source_name": sources["train"].name,
        "source_fingerprint": sources["train"].fingerprint(),
        "tokenizer_hash": tokenizer_hash(root / TOKENIZER_DIR),
        "modalities": list(tokenizer.modalities),
        "docs_per_shard": docs_per_shard,
        "splits": {s: int(n) for s, n in num_docs.items()},
    }
    _check_plan(root, plan)
    todo = [
        (split, k)
        for split, n in plan["splits"].items()
        for k in range(_num_shards(n, docs_per_shard))
        if k % num_workers == worker and not _complete(root / split, k)
    ]
    total = sum(_shard_size(plan["splits"][s], docs_per_shard, k) for s, k in todo)
    bar = tqdm(total=total, unit="doc", desc="tokenize", disable=not progress)
    kill_after = _fault("kill_after_shards")
    for done, (split, k) in enumerate(todo, start=1):
        n = _shard_size(plan["splits"][split], docs_per_shard, k)
        (root / split).mkdir(exist_ok=True)
        _write_shard(
            sources[split], tokenizer, shard_stem(root / split, k), k * docs_per_shard, n,
            docs_per_call=docs_per_call, strict=strict, bar=bar,
        )  # fmt: skip
        if kill_after and done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return _finalize(root, plan)


def _num_shards(num_docs: int, per: int) -> int:
    return -(-num_docs // per)


def _shard_size(num_docs: int, per: int, k: int) -> int:
    return min(per, num_docs - k * per)


def _complete(split_dir: Path, k: int) -> bool:
    return shard_stem(split_dir, k).with_suffix(".json").is_file()


def _fault(name: str) -> int:
    for item in os.environ.get(FAULT_ENV, "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == name and value.strip():
            return int(value)
    return 0


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_tokenizer(tokenizer: Any, root: Path) -> None:
    """``root/tokenizer`` (kept when present; workers racing here write the same files)."""
    final = root / TOKENIZER_DIR
    if final.is_dir():
        return
    tmp = root / f".{TOKENIZER_DIR}.{os.getpid()}.tmp"
    tokenizer.save(tmp)
    try:
        os.rename(tmp, final)
    except OSError:  # another worker was first
        shutil.rmtree(tmp, ignore_errors=True)


def _check_plan(root: Path, plan: dict[str, Any]) -> None:
    path = root / PLAN
    if path.is_file():
        old = json.loads(path.read_text("utf-8"))
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if diff:
            raise ValueError(
                f"{root}: started with other settings ({', '.join(diff)} differ: "
                f"{ {k: old.get(k) for k in diff} } vs { {k: plan.get(k) for k in diff} }); "
                "use another --out or the same source, tokenizer and options"
            )
        return
    _atomic_write_text(path, json.dumps(plan, indent=2, sort_keys=True))


def _write_shard(source, tokenizer, stem: Path, first: int, count: int, *, docs_per_call: int,
                 strict: bool, bar) -> None:  # fmt: skip
    """Encode documents ``first .. first + count - 1`` into the shard files at ``stem``."""
    ids, mods, lengths = [], [], [0] * count
    parts: list[list[int]] = []  # (document, modality, start, stop, value) of recorded segments
    values: list[np.ndarray] = []  # continuous span values, in order
    names = list(tokenizer.modalities)
    skipped: dict[str, list[str]] = {}
    for start in range(0, count, docs_per_call):
        docs, local = [], []
        for j in range(start, min(count, start + docs_per_call)):
            try:
                docs.append(read_document(source, first + j, names))
                local.append(j)
            except BadInput as e:
                if strict:
                    raise
                skipped[str(j)] = [e.reason, e.where, e.detail]
        for j, encoded in zip(local, tokenizer.encode_documents(docs), strict=True):
            enc = as_encoded(encoded)
            ids.append(np.asarray(enc.ids, dtype=np.int32))
            mods.append(np.asarray(enc.modalities, dtype=np.uint8))
            lengths[j] = len(enc.ids)
            for part in enc.parts:
                value = -1 if part.value is None else len(values)
                if part.value is not None:
                    values.append(part.value.numpy())
                parts.append([j, names.index(part.modality), part.start, part.stop, value])
        bar.update(min(count, start + docs_per_call) - start)
    ids_N = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    mod_N = np.concatenate(mods) if mods else np.zeros(0, np.uint8)
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arrays = [(".ids.npy", ids_N), (".mod.npy", mod_N), (".off.npy", offsets)]
    if parts:  # a tokenizer that records segments (the Transfusion one: image latents)
        arrays.append((".parts.npy", np.asarray(parts, dtype=np.int64)))
        arrays.append((".values.npy", np.stack(values) if values else np.zeros(0, np.float32)))
    for suffix, arr in arrays:
        tmp = Path(f"{stem}{suffix}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, f"{stem}{suffix}")
    per_mod = np.bincount(mod_N, minlength=len(names)).tolist() if len(mod_N) else [0] * len(names)
    meta = {
        "first_doc": first,
        "num_docs": count,
        "tokens": int(len(ids_N)),
        "tokens_per_modality": dict(zip(names, per_mod, strict=False)),
        "skipped": skipped,
    }
    _atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, sort_keys=True))


def _finalize(root: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
    """Write ``manifest.json`` once every shard of every split is complete."""
    per = plan["docs_per_shard"]
    splits: dict[str, Any] = {}
    for split, n in plan["splits"].items():
        shards, tokens, per_mod, skipped = [], 0, dict.fromkeys(plan["modalities"], 0), {}
        for k in range(_num_shards(n, per)):
            path = shard_stem(root / split, k).with_suffix(".json")
            if not path.is_file():
                return None
            meta = json.loads(path.read_text("utf-8"))
            shards.append(
                {"name": path.stem, "first_doc": meta["first_doc"], "num_docs": meta["num_docs"],
                 "tokens": meta["tokens"]}
            )  # fmt: skip
            tokens += meta["tokens"]
            for m, c in meta["tokens_per_modality"].items():
                per_mod[m] = per_mod.get(m, 0) + c
            for reason, _, _ in meta["skipped"].values():
                skipped[reason] = skipped.get(reason, 0) + 1
        splits[split] = {
            "documents": n,
            "tokens": tokens,
            "tokens_per_modality": per_mod,
            "skipped": dict(sorted(skipped.items())),
            "shards": shards,
        }
    manifest = {k: v for k, v in plan.items() if k != "splits"}
    manifest["splits"] = splits
    _atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest

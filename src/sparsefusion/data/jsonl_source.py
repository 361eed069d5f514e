"""Users' interleaved documents from a JSONL file: one document per line.

A line is a JSON list of segments, or an object with a ``"segments"`` list (other keys are kept in
``Document.meta``). A segment is ``{"text": "..."}``, ``{"image": "path.png"}`` or
``{"audio": "clip.wav"}``; paths are relative to the JSONL file. Example::

    [{"text": "A cat on a mat."}, {"image": "img/cat.png"}]
    {"segments": [{"image": "img/dog.jpg"}, {"text": "A dog."}, {"audio": "wav/dog.wav"}]}

Lines are indexed (byte offsets) when the source is built and parsed on access, so a malformed
line, a missing or corrupt file, an unknown segment type or an empty document raises
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

SEGMENT_KEYS = {"text": TEXT, "image": IMAGE, "audio": SPEECH}


def split_range(n: int, split: str, val_fraction: float) -> range:
    """Train = the first lines, val = the last ``val_fraction`` (at least one when ``n >= 2``)."""
    if n < 2 or val_fraction <= 0:
        return range(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return range(n - n_val, n) if split == "val" else range(n - n_val)


class JsonlSource:
    """Finite, random-access source over a JSONL file of interleaved documents.

    Args:
        path: the JSONL file.
        split: ``"train"`` or ``"val"``.
        image_size: side of the (centre-cropped, resized) images.
        val_fraction: fraction of the lines held out for val.
    """

    name = "jsonl"

    def __init__(
        self, path: str, *, split: str = "train", image_size: int = 32, val_fraction: float = 0.05
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"data.path: {path} is not a file")
        self.image_size = image_size
        raw = self.path.read_bytes()
        self._digest = hashlib.sha256(raw).hexdigest()[:16]
        self._lines: list[tuple[int, int]] = []  # (byte offset, 1-based line number)
        offset = 0
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if line.strip():
                self._lines.append((offset, number))
            offset += len(line) + 1
        self._range = split_range(len(self._lines), split, val_fraction)
        self.modalities = [TEXT, IMAGE, SPEECH] if b'"audio"' in raw else [TEXT, IMAGE]

    def __len__(self) -> int:
        return len(self._range)

    def fingerprint(self) -> str:
        return f"jsonl-{self._digest}-img{self.image_size}"

    def document(self, index: int) -> Document:
        """Document ``index`` of this split (raises ``IndexError`` past the end)."""
        offset, number = self._lines[self._range[index]]
        where = f"{self.path.name}:{number}"
        with open(self.path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput("bad_json", where, f"invalid JSON ({e})") from e
        meta: dict[str, Any] = {"source": self.name, "where": where, "index": index}
        if isinstance(obj, dict):
            meta.update({k: v for k, v in obj.items() if k != "segments"})
            obj = obj.get("segments")
        if not isinstance(obj, list):
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
        if key == "image":
            return Segment(IMAGE, read_image(file, f"{where} ({value})", self.image_size))
        return Segment(SPEECH, read_wav(file, f"{where} ({value})"))

"""Users' image-caption pairs from a folder of WebDataset ``.tar`` shards (read with ``tarfile``).

WebDataset convention: members sharing a key (the path up to the first dot of the file name) form
one sample, e.g. ``0001.png`` + ``0001.txt`` (caption) and optionally ``0001.wav`` (speech). A
sample becomes ``[caption, image]`` or ``[image, caption]`` (chosen by a hash of its index, half
each); a wav member is appended as a speech segment. Shards are indexed (member headers only) when
the source is built; a damaged shard keeps the members read before the damage (logged; fatal in
strict mode). Members are decoded on access and a bad one raises
:class:`~sparsefusion.data.issues.BadInput` naming ``shard.tar:member``.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from pathlib import Path
from typing import Any

from sparsefusion.data.audio import decode_wav_bytes
from sparsefusion.data.documents import IMAGE, SPEECH, TEXT, Document, Segment
from sparsefusion.data.images import IMAGE_EXTENSIONS, decode_image_bytes
from sparsefusion.data.issues import BadInput
from sparsefusion.data.jsonl_source import split_range
from sparsefusion.data.limits import InputLimits

log = logging.getLogger("sparsefusion")
CAPTION_EXTENSIONS = ("txt", "caption", "cap")


def _split_key(member: str) -> tuple[str, str]:
    parent, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{parent}/{stem}" if parent else stem), ext.lower()


class WebDatasetSource:
    """Finite, random-access source over ``*.tar`` shards in a folder.

    Args:
        folder: the folder holding the shards (searched non-recursively, sorted by name).
        split: ``"train"`` or ``"val"`` (the last ``val_fraction`` of the samples).
        image_size: side of the (centre-cropped, resized) images.
        val_fraction: fraction of samples held out for val.
        strict: raise on a damaged shard instead of logging it.
        limits: per-record size limits (checked before decoding).

    Raises:
        ValueError: when the folder holds no ``.tar`` shard, or no sample in any of them.
    """

    name = "webdataset"

    def __init__(
        self,
        folder: str,
        *,
        split: str = "train",
        image_size: int = 32,
        val_fraction: float = 0.05,
        strict: bool = False,
        limits: InputLimits | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.shards = sorted(self.folder.glob("*.tar"))
        if not self.shards:
            raise ValueError(f"data.path: no .tar shards in {folder}")
        self.image_size = image_size
        self.limits = limits or InputLimits()
        self._samples: list[tuple[Path, str, dict[str, tarfile.TarInfo]]] = []
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(f"{shard.name}:{shard.stat().st_size}".encode())
            self._index(shard, strict)
        self._digest = digest.hexdigest()[:16]
        if not self._samples:
            names = ", ".join(p.name for p in self.shards)
            raise ValueError(
                f"data.path: no sample could be read from the shards in {folder} ({names}); "
                "are they WebDataset .tar files?"
            )
        self._range = split_range(len(self._samples), split, val_fraction)
        self._open: dict[Path, tarfile.TarFile] = {}
        has_audio = any("wav" in m for _, _, m in self._samples)
        self.modalities = [TEXT, IMAGE, SPEECH] if has_audio else [TEXT, IMAGE]

    def _index(self, shard: Path, strict: bool) -> None:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for info in tar:
                    if info.isfile():
                        key, ext = _split_key(info.name)
                        groups.setdefault(key, {})[ext] = info
        except (tarfile.TarError, OSError, EOFError) as e:
            if strict:
                raise BadInput("corrupt_image", shard.name, f"damaged shard ({e})") from e
            log.warning(
                "data: shard %s is damaged (%s); using the %d samples before it",
                shard,
                e,
                len(groups),
            )
        self._samples.extend((shard, key, members) for key, members in groups.items())

    def __len__(self) -> int:
        return len(self._range)

    def fingerprint(self) -> str:
        return f"wds-{self._digest}-img{self.image_size}"

    def _read(self, shard: Path, info: tarfile.TarInfo, where: str, key: str) -> bytes:
        """A member's bytes; ``key`` names its limit (``max_doc_bytes`` or ``max_file_bytes``)."""
        limit = getattr(self.limits, key)
        if info.size > limit:
            reason = "oversize_document" if key == "max_doc_bytes" else "oversize_file"
            raise BadInput(reason, where, f"member has {info.size} bytes > data.{key}={limit}")
        tar = self._open.get(shard)
        if tar is None:
            tar = self._open[shard] = tarfile.open(shard, "r:")
        try:
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BadInput("missing_file", where, f"cannot read member ({e})") from e
        if len(data) != info.size:
            raise BadInput("missing_file", where, "member is truncated")
        return data

    def document(self, index: int) -> Document:
        """Sample ``index`` of this split as a caption-image document."""
        shard, key, members = self._samples[self._range[index]]
        where = f"{shard.name}:{key}"
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        caption_ext = next((e for e in CAPTION_EXTENSIONS if e in members), None)
        if image_ext is None and caption_ext is None and "wav" not in members:
            raise BadInput("unknown_segment", where, f"no usable member among {sorted(members)}")
        segments: list[Segment] = []
        caption = ""
        if caption_ext is not None:
            raw = self._read(shard, members[caption_ext], f"{where}.{caption_ext}", "max_doc_bytes")
            caption = raw.decode("utf-8", errors="replace").strip()
        if image_ext is not None:
            place = f"{where}.{image_ext}"
            data = self._read(shard, members[image_ext], place, "max_file_bytes")
            image = Segment(IMAGE, decode_image_bytes(data, place, self.image_size, self.limits))
            text = [Segment(TEXT, caption)] if caption else []
            caption_first = hashlib.blake2b(f"{key}".encode(), digest_size=1).digest()[0] < 128
            segments = [*text, image] if caption_first else [image, *text]
        elif caption:
            segments = [Segment(TEXT, caption)]
        if "wav" in members:
            data = self._read(shard, members["wav"], f"{where}.wav", "max_file_bytes")
            clip = decode_wav_bytes(data, f"{where}.wav", self.limits.max_audio_seconds)
            segments.append(Segment(SPEECH, clip))
        if not segments:
            raise BadInput("empty_document", where, "sample has an empty caption and no media")
        meta: dict[str, Any] = {"source": self.name, "where": where, "index": index}
        meta["captions"] = [caption] if caption else []
        return Document(segments=segments, meta=meta)

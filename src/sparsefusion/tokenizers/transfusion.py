"""The Transfusion tokenizer: documents -> text ids plus image latents (arXiv 2408.11039).

A document becomes ``[BOS] seg_1 ... [EOS]`` where a text segment is its BPE ids and an image
segment is ``[BOI] p_1 .. p_n [EOI]``: n = (h / k) * (w / k) continuous positions, the k x k
patches of the image's VAE latent in raster order (k = ``model.patch_size``, adopted with
:meth:`TransfusionTokenizer.bind_model`). A patch position holds the one id of the ``image``
modality (a placeholder the model overwrites with the patch embedding); sentinels are text
positions, as in the Chameleon setting (``vocab.py``). An image is a continuous span of the
encoded document (``data/encoded.py``): its latent travels beside the ids, one (Z, h, w) tensor,
unpatchified (noise is added to the whole latent before patchifying, in the objective).

Saved like :class:`MultimodalTokenizer` (a manifest of SHA-256 hashes, verified on load), with
``kind: latent`` in the manifest, and the patch size when the tokenizer was bound to one (the
copy ``data tokenize`` keeps beside its shards, whose ids depend on it).

Shape legend: Z = latent channels, h/w = latent side, k = patch side.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from sparsefusion.data.documents import IMAGE, TEXT, Document
from sparsefusion.data.encoded import Encoded, Part
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.tokenizers.image_vae import VAEImageTokenizer
from sparsefusion.tokenizers.manifest import MANIFEST, read_manifest, verify_files, write_manifest
from sparsefusion.tokenizers.multimodal import TokenizerCacheError
from sparsefusion.tokenizers.text_bpe import BPETextTokenizer
from sparsefusion.tokenizers.vocab import UnifiedVocab

FILES = ("text.json", "image_vae.safetensors", "image_vae.json", "vocab.json")
FORMAT_VERSION = 1
KIND = "latent"


class TransfusionTokenizerError(TokenizerCacheError):
    """A saved Transfusion tokenizer directory is missing files, corrupt, or inconsistent."""


@dataclass
class LatentDocument:
    """One encoded document, as the generator reads a prompt.

    Attributes:
        ids: unified ids (patch positions hold the image placeholder id).
        modalities: modality index per id (patches: the image index).
        latents: one (Z, h, w) float tensor per image, in order.
        boi: index in ``ids`` of each image's BOI.
    """

    ids: list[int]
    modalities: list[int]
    latents: list[torch.Tensor]
    boi: list[int]


class TransfusionTokenizer:
    """Text BPE + VAE latents + the unified vocabulary (text ids, sentinels, one image id).

    Args:
        text: the text BPE.
        vae: the image autoencoder.
        vocab: ``{"text": text size, "image": 1}``.
        patch_size: latent patch side k an image is cut into (None: not bound yet; see
            :meth:`bind_model`).
    """

    def __init__(
        self,
        text: BPETextTokenizer,
        vae: VAEImageTokenizer,
        vocab: UnifiedVocab,
        patch_size: int | None = None,
    ):
        if vocab.modalities != [TEXT, IMAGE] or vocab.modality_sizes[IMAGE] != 1:
            raise ValueError(f"a Transfusion tokenizer's vocab is text + one image id, got {vocab}")
        if vocab.modality_sizes[TEXT] != text.vocab_size:
            raise ValueError("vocab text size differs from the BPE's")
        self.text, self.vae, self.vocab = text, vae, vocab
        self.patch_size = patch_size
        self.image = vae  # what `data preview` and `tokenizer inspect` look at
        self.speech = None
        self.patch_id = vocab.offset(IMAGE)
        self._text_off = vocab.offset(TEXT)
        self._image_idx = vocab.modality_index(IMAGE)

    @property
    def modalities(self) -> list[str]:
        return list(self.vocab.modalities)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(Z, h, w) of one image's latent."""
        return self.vae.latent_shape

    def patches_per_image(self, patch_size: int) -> int:
        """n = (h / k) * (w / k) (ValueError naming the key when k does not divide the grid)."""
        _, h, w = self.latent_shape
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"model.patch_size={patch_size} does not divide the {h}x{w} latent grid"
            )
        return (h // patch_size) * (w // patch_size)

    def bind_model(self, model: ModelConfig) -> ModelConfig:
        """Fit this tokenizer and the model it feeds to each other: the tokenizer cuts images
        into ``model.patch_size`` patches from now on; the model gets ``latent_channels`` from
        the VAE (and ``latent_size``, the latent side, when its patch layers are a U-Net).

        Raises:
            ValueError: naming the key, when the patch size does not divide the latent grid,
                differs from the one a saved copy was bound to, or ``model.latent_channels``
                (``model.latent_size``) disagrees with the VAE.
        """
        channels = self.latent_shape[0]
        if model.latent_channels not in (0, channels):
            raise ValueError(
                f"model.latent_channels={model.latent_channels} but the VAE has {channels}"
            )
        if self.patch_size not in (None, model.patch_size):
            raise ValueError(
                f"this tokenizer encodes images in patches of {self.patch_size} (e.g. the token "
                f"shards made with it); set model.patch_size={self.patch_size}, not "
                f"{model.patch_size}"
            )
        self.patches_per_image(model.patch_size)  # raises naming model.patch_size
        self.patch_size = model.patch_size
        if model.patch_layers != "unet":
            return replace(model, latent_channels=channels)
        side = self.latent_shape[1]
        if model.latent_size not in (0, side):
            raise ValueError(
                f"model.latent_size={model.latent_size} but the VAE's latent is {side}"
            )
        return replace(model, latent_channels=channels, latent_size=side)

    def describe_image(self) -> str:
        """One line on how an image is encoded (``sparsefusion tokenizer inspect``)."""
        z, h, w = self.latent_shape
        return (
            f"VAE latent {z}x{h}x{w} per {self.vae.cfg.image_size}px image (scale "
            f"{float(self.vae.scale):.4f}); 2x2 patches -> {self.patches_per_image(2)} positions"
        )

    def encode_documents(self, docs: list[Document]) -> list[Encoded]:
        """Documents -> ids with n placeholder positions per image; every image is a continuous
        span holding its latent (``data/encoded.py``). All images go through one VAE call."""
        if self.patch_size is None:
            raise ValueError(
                "the Transfusion tokenizer is not bound to a model yet (bind_model): the patch "
                "size decides how many positions an image takes"
            )
        return self._encode(docs, self.patches_per_image(self.patch_size))

    def encode_latent_documents(
        self, docs: list[Document], patch_size: int
    ) -> list[LatentDocument]:
        """Documents -> ids with n placeholder positions per image, the latents and the BOI
        index of each image (how the generator encodes a prompt)."""
        return [
            LatentDocument(
                e.ids, e.modalities, [p.value for p in e.spans], [p.start for p in e.spans]
            )  # fmt: skip
            for e in self._encode(docs, self.patches_per_image(patch_size))
        ]

    def _encode(self, docs: list[Document], n: int) -> list[Encoded]:
        images: list[Image.Image] = []
        texts: list[str] = []
        for doc in docs:
            for seg in doc.segments:
                if seg.modality == IMAGE:
                    images.append(seg.payload)
                elif seg.modality == TEXT:
                    texts.append(seg.payload)
                else:
                    raise ValueError(
                        f"cannot tokenize segment modality {seg.modality!r}; supported: "
                        f"{self.modalities}"
                    )
        latents = list(self.vae.encode(images)) if images else []
        text_rows = [[i + self._text_off for i in t] for t in self.text.encode_batch(texts)]
        out, next_image, next_text = [], 0, 0
        for doc in docs:
            ids, mods, parts = [self.vocab.bos_id], [0], []
            for seg in doc.segments:
                start = len(ids)
                if seg.modality == TEXT:
                    t = text_rows[next_text]
                    next_text += 1
                    ids += t
                    mods += [0] * len(t)
                    parts.append(Part(TEXT, start, len(ids)))
                else:
                    ids += [self.vocab.boi_id, *([self.patch_id] * n), self.vocab.eoi_id]
                    mods += [0, *([self._image_idx] * n), 0]
                    parts.append(Part(IMAGE, start, len(ids), value=latents[next_image]))
                    next_image += 1
            ids.append(self.vocab.eos_id)
            mods.append(0)
            out.append(Encoded(ids, mods, parts))
        return out

    def decode_text(self, ids: list[int]) -> str:
        """The text of the text ids among ``ids`` (other ids are dropped)."""
        lo, hi = self._text_off, self._text_off + self.text.vocab_size
        return self.text.decode([i - lo for i in ids if lo <= i < hi])

    # ---- persistence --------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write text.json, image_vae.safetensors/.json, vocab.json and manifest.json."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.text.save(d / "text.json")
        self.vae.save(d / "image_vae.safetensors")
        (d / "vocab.json").write_text(json.dumps(self.vocab.to_dict(), indent=2), encoding="utf-8")
        extra = {} if self.patch_size is None else {"patch_size": self.patch_size}
        write_manifest(d, FILES, format_version=FORMAT_VERSION, kind=KIND, **extra)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TransfusionTokenizer:
        """Load a directory written by :meth:`save`, verifying every file hash.

        Raises:
            TransfusionTokenizerError: on a missing/corrupt file, a hash mismatch or another
                kind.
        """
        d = Path(directory)
        manifest = _verify(d)
        try:
            text = BPETextTokenizer.load(d / "text.json")
            vae = VAEImageTokenizer.load(d / "image_vae.safetensors")
            vocab = UnifiedVocab.from_dict(json.loads((d / "vocab.json").read_text("utf-8")))
            return cls(text, vae, vocab, manifest.get("patch_size"))
        except ImportError:
            raise
        except Exception as e:  # any parse / shape error means the cache cannot be trusted
            raise TransfusionTokenizerError(f"{d}: cannot load Transfusion tokenizer ({e})") from e


def manifest_kind(directory: str | os.PathLike[str]) -> str:
    """``latent`` (the Transfusion tokenizer) or ``discrete`` (the Chameleon one) of a directory."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return "discrete"
    return str(manifest.get("kind", "discrete"))


def _verify(d: Path) -> dict:
    manifest = read_manifest(d, TransfusionTokenizerError)
    files, version, kind = manifest["files"], manifest["format_version"], manifest.get("kind")
    if kind != KIND or version != FORMAT_VERSION:
        raise TransfusionTokenizerError(
            f"{d}: not a Transfusion tokenizer (kind={kind}, v{version})"
        )
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise TransfusionTokenizerError(
            f"{d}: manifest lists {sorted(files)}, expected {list(FILES)}"
        )
    verify_files(d, files, TransfusionTokenizerError)
    return manifest

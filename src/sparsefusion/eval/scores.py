"""``fid_sf`` and ``clip_sf``: image-quality and caption-agreement scores from the project's own
evaluator networks (:mod:`sparsefusion.eval.evaluators`).

- ``fid_sf``: the Frechet distance between Gaussians fitted to :class:`FeatureNet` features of two
  image sets, computed by torchmetrics' ``FrechetInceptionDistance(feature=FeatureNet)``. Not
  Inception FID: the features come from a small CNN trained on the run's own corpus, so values
  are comparable only between runs on the same corpus with the same evaluator (its manifest).
- ``clip_sf``: 100 x the mean over pairs of ``max(0, cos(image embedding, caption embedding))``
  of :class:`ContrastiveNet` (the convention of torchmetrics' CLIPScore). Not OpenAI CLIP.

Legend: N = images, C = 3, H = W = image side, D = embedding width.
"""

from __future__ import annotations

import torch

from sparsefusion.eval.evaluator_nets import ContrastiveNet, FeatureNet
from sparsefusion.eval.evaluators import Evaluators

INSTALL_HINT = (
    "fid_sf needs torchmetrics: pip install 'sparsefusion[eval]' (or pip install torchmetrics)"
)


def _fid_class():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return FrechetInceptionDistance


@torch.no_grad()
def fid_sf(net: FeatureNet, real_NCHW: torch.Tensor, fake_NCHW: torch.Tensor) -> float:
    """Frechet distance of the two image sets (floats in [0, 1]) in ``net``'s feature space.

    Raises:
        ValueError: with fewer than 2 images in a set.
    """
    if len(real_NCHW) < 2 or len(fake_NCHW) < 2:
        raise ValueError(
            f"fid_sf needs >= 2 images per set, got {len(real_NCHW)}, {len(fake_NCHW)}"
        )
    fid = _fid_class()(feature=net, normalize=True, reset_real_features=True)
    for i in range(0, len(real_NCHW), 256):
        fid.update(real_NCHW[i : i + 256].float(), real=True)
    for i in range(0, len(fake_NCHW), 256):
        fid.update(fake_NCHW[i : i + 256].float(), real=False)
    return max(0.0, float(fid.compute()))


@torch.no_grad()
def clip_similarities(
    ev: Evaluators, images_NCHW: torch.Tensor, captions: list[str]
) -> torch.Tensor:
    """Cosine similarity of each image with its caption: (N,)."""
    if len(images_NCHW) != len(captions):
        raise ValueError(f"{len(images_NCHW)} images but {len(captions)} captions")
    clip: ContrastiveNet = ev.clip
    return (clip.embed_images(images_NCHW) * ev.embed_captions(captions)).sum(-1)


def clip_sf(ev: Evaluators, images_NCHW: torch.Tensor, captions: list[str]) -> float:
    """100 x mean ``max(0, cos)`` of each image with its caption."""
    if len(captions) == 0:
        raise ValueError("clip_sf needs at least one image-caption pair")
    return float(100.0 * clip_similarities(ev, images_NCHW, captions).clamp_min(0).mean())

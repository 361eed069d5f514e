"""The evaluator networks the project trains on a run's corpus (no downloaded weights).

- :class:`FeatureNet`: a small CNN that predicts which label words (colours, shapes, places,
  product classes ...) a caption of the image contains; its pooled features (``num_features``)
  feed torchmetrics' Frechet distance as ``fid_sf``.
- :class:`ContrastiveNet`: a CNN image encoder and a GRU caption encoder trained with the
  symmetric InfoNCE loss (as CLIP, arXiv:2103.00020, at toy scale); the cosine similarity of the
  two embeddings is ``clip_sf``.

Legend: N = images, C = channels, H = W = image side, L = words, D = feature/embedding width,
K = label words.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ImageEncoder(nn.Module):
    """Images in [0, 1] (N, 3, H, W) -> features (N, D): three conv stages and average pooling."""

    def __init__(self, dim: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, dim),
        )

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return self.net(x_NCHW.float() - 0.5)


class FeatureNet(nn.Module):
    """Image feature network for ``fid_sf``: features (N, D) and label-word logits (N, K).

    ``forward`` returns the features, as torchmetrics' ``FrechetInceptionDistance(feature=...)``
    expects (with ``normalize=True`` it passes floats in [0, 1]).

    Args:
        num_labels: K label words.
        dim: feature width D (``num_features``).
        image_size: the side images are resized to before encoding.
    """

    def __init__(self, num_labels: int, dim: int, image_size: int) -> None:
        super().__init__()
        self.num_features = dim
        self.image_size = image_size
        self.encoder = ImageEncoder(dim)
        self.head = nn.Linear(dim, num_labels)

    def features(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        x_NCHW = x_NCHW.float()
        if x_NCHW.shape[-1] != self.image_size or x_NCHW.shape[-2] != self.image_size:
            size = (self.image_size, self.image_size)
            x_NCHW = F.interpolate(x_NCHW, size=size, mode="bilinear", antialias=True)
        return F.relu(self.encoder(x_NCHW))

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        if x_NCHW.dtype == torch.uint8:
            x_NCHW = x_NCHW.float() / 255.0
        return self.features(x_NCHW)

    def label_logits(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_NCHW))


class TextEncoder(nn.Module):
    """Word ids (N, L), 0 = padding -> caption embedding (N, D): embedding, BiGRU, masked mean."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.gru = nn.GRU(dim, dim, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * dim, dim)

    def forward(self, ids_NL: torch.Tensor) -> torch.Tensor:
        h_NLD, _ = self.gru(self.embed(ids_NL))
        mask_NL1 = (ids_NL != 0).unsqueeze(-1).float()
        pooled_ND = (h_NLD * mask_NL1).sum(1) / mask_NL1.sum(1).clamp_min(1.0)
        return self.out(pooled_ND)


class ContrastiveNet(nn.Module):
    """Caption and image embeddings in one space, for ``clip_sf``.

    Args:
        vocab_size: caption word vocabulary (with padding and unknown).
        dim: embedding width D.
        image_size: the side images are resized to.
    """

    def __init__(self, vocab_size: int, dim: int, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.image = ImageEncoder(dim)
        self.text = TextEncoder(vocab_size, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_images(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (N, D)."""
        x_NCHW = x_NCHW.float()
        if x_NCHW.shape[-1] != self.image_size or x_NCHW.shape[-2] != self.image_size:
            size = (self.image_size, self.image_size)
            x_NCHW = F.interpolate(x_NCHW, size=size, mode="bilinear", antialias=True)
        return F.normalize(self.image(x_NCHW), dim=-1)

    def embed_texts(self, ids_NL: torch.Tensor) -> torch.Tensor:
        """Unit-norm caption embeddings (N, D)."""
        return F.normalize(self.text(ids_NL), dim=-1)

    def loss(self, x_NCHW: torch.Tensor, ids_NL: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over the batch (pair i matches pair i)."""
        logits_NN = self.log_scale.exp().clamp(max=100.0) * (
            self.embed_images(x_NCHW) @ self.embed_texts(ids_NL).T
        )
        target_N = torch.arange(len(ids_NL), device=ids_NL.device)
        return 0.5 * (F.cross_entropy(logits_NN, target_N) + F.cross_entropy(logits_NN.T, target_N))

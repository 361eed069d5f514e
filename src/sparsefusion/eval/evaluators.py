"""Train the evaluator networks on a corpus, measure their held-out accuracy, cache them.

The cache directory is ``<cache_dir>/<source.name>-<key>`` where ``key`` hashes the
:class:`EvaluatorConfig` (without ``cache_dir`` and ``path``) and ``source.fingerprint()``; its
``manifest.json`` records the corpus fingerprint, the settings, the word vocabulary and the
networks' held-out accuracies. Loading checks the manifest against the run's corpus and refuses a
network trained on another corpus (also one given as ``path``), never reusing it silently.

The networks learn from pairs of the training split (documents from 0 on, corpus seed 0, as the
tokenizers do) and are scored on pairs of the validation split, which they never see.

Legend: N = pairs, K = label words.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparsefusion.eval.evaluator_nets import ContrastiveNet, FeatureNet
from sparsefusion.eval.pairs import WordVocab, images_to_tensor, read_pairs

FORMAT = "sparsefusion-evaluators-v2"
RETRIEVAL_GROUP = 32


class EvaluatorError(ValueError):
    """An evaluator that cannot be used (no image pairs, another corpus, a damaged cache)."""


@dataclass(kw_only=True)
class EvaluatorConfig:
    """How the evaluator networks are trained (``eval.evaluator.*``).

    Attributes:
        train_pairs: caption-image pairs of the training split they learn from.
        heldout_pairs: pairs of the validation split their accuracy is measured on.
        epochs: passes over the training pairs (each network).
        batch_size: pairs per optimizer step (also the InfoNCE batch).
        lr: Adam learning rate.
        dim: feature / embedding width (``fid_sf`` feature count).
        num_labels: labels (visual attributes or caption words) the feature network predicts
            (at most).
        max_words: caption vocabulary of the text encoder.
        max_len: caption words read by the text encoder.
        seed: initialisation and shuffling seed.
        cache_dir: root of the evaluator cache (not part of the key).
        path: a trained evaluator folder to use (still checked against the run's corpus).
    """

    train_pairs: int = 4000
    heldout_pairs: int = 512
    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    dim: int = 64
    num_labels: int = 128
    max_words: int = 2000
    max_len: int = 48
    seed: int = 0
    cache_dir: str = ".cache/sparsefusion/evaluators"
    path: str = ""

    def __post_init__(self) -> None:
        for name in ("train_pairs", "heldout_pairs", "epochs", "batch_size", "dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.evaluator.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_labels", "max_words", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.evaluator.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.lr != self.lr:
            raise ValueError(f"eval.evaluator.lr must be > 0, got {self.lr}")
        if not self.cache_dir:
            raise ValueError("eval.evaluator.cache_dir must not be empty")


@dataclass
class Evaluators:
    """The trained networks, their vocabulary and manifest (accuracies included)."""

    vocab: WordVocab
    features: FeatureNet
    clip: ContrastiveNet
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @torch.no_grad()
    def embed_captions(self, captions: list[str]) -> torch.Tensor:
        return self.clip.embed_texts(self.vocab.encode(captions, self.manifest["max_len"]))


def cache_key(cfg: EvaluatorConfig, source: Any) -> str:
    settings = asdict(cfg)
    settings.pop("cache_dir")
    settings.pop("path")
    blob = {"cfg": settings, "source": source.fingerprint(), "format": FORMAT}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def load_or_train(
    cfg: EvaluatorConfig,
    train_source: Any,
    val_source: Any,
    *,
    image_size: int,
    log: Callable[[str], None] = print,
) -> Evaluators:
    """The evaluators of a corpus: ``cfg.path``, else a verified cached copy, else trained now.

    Raises:
        EvaluatorError: the corpus has no caption-image pairs, or the given/cached evaluator was
            trained on another corpus or is damaged.
    """
    fingerprint = train_source.fingerprint()
    if cfg.path:
        ev = load_evaluators(cfg.path)
        check_corpus(ev, fingerprint, where="eval.evaluator.path")
        log(f"evaluators: loaded {cfg.path}")
        return ev
    final = Path(cfg.cache_dir) / f"{train_source.name}-{cache_key(cfg, train_source)}"
    if final.exists():
        ev = load_evaluators(final)
        check_corpus(ev, fingerprint, where=str(final))
        log(f"evaluators: loaded {final}")
        return ev
    ev = train_evaluators(cfg, train_source, val_source, image_size=image_size, log=log)
    _save_atomically(ev, final)
    ev.path = final
    log(f"evaluators: saved {final}")
    return ev


def check_corpus(ev: Evaluators, fingerprint: str, *, where: str) -> None:
    """Refuse an evaluator whose manifest names another corpus than ``fingerprint``."""
    trained_on = ev.manifest.get("source_fingerprint")
    if trained_on != fingerprint:
        raise EvaluatorError(
            f"{where}: the evaluator networks were trained on corpus {trained_on!r}, but this "
            f"run's corpus is {fingerprint!r}; refusing to reuse them (remove eval.evaluator.path "
            "to train evaluators on this corpus)"
        )


def train_evaluators(
    cfg: EvaluatorConfig,
    train_source: Any,
    val_source: Any,
    *,
    image_size: int,
    log: Callable[[str], None] = print,
) -> Evaluators:
    """Train both networks on the training pairs and score them on held-out pairs (no cache)."""
    train = read_pairs(train_source, cfg.train_pairs)
    heldout = read_pairs(val_source, cfg.heldout_pairs)
    if len(train) < 2 * cfg.batch_size // 4 or len(heldout) < 2:
        raise EvaluatorError(
            f"corpus {train_source.name!r} has too few caption-image pairs "
            f"({len(train)} train, {len(heldout)} held out) to train the evaluator networks"
        )
    t0 = time.perf_counter()
    vocab = WordVocab.build(train, max_words=cfg.max_words, num_labels=cfg.num_labels)
    if not vocab.labels:
        raise EvaluatorError(f"corpus {train_source.name!r}: its pairs give no labels to learn")
    torch.manual_seed(cfg.seed)
    features = FeatureNet(len(vocab.labels), cfg.dim, image_size)
    torch.manual_seed(cfg.seed + 1)  # its own stream: independent of the number of labels
    clip = ContrastiveNet(vocab.size, cfg.dim, image_size)
    x_train, x_held = images_to_tensor([p.image for p in train], image_size), None
    x_held = images_to_tensor([p.image for p in heldout], image_size)
    _fit_features(features, x_train, vocab.label_targets(train), cfg)
    _fit_clip(clip, x_train, vocab.encode([p.caption for p in train], cfg.max_len), cfg)
    features.eval()
    clip.eval()
    acc = feature_accuracy(features, x_held, vocab.label_targets(heldout))
    acc.update(
        retrieval_accuracy(clip, x_held, vocab.encode([p.caption for p in heldout], cfg.max_len))
    )
    manifest = {
        "format": FORMAT,
        "source_name": train_source.name,
        "source_fingerprint": train_source.fingerprint(),
        "image_size": image_size,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "path")},
        "max_len": cfg.max_len,
        "labels": f"{len(vocab.labels)} {vocab.label_source}",
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "heldout": acc,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "vocab": vocab.to_dict(),
    }
    log(f"evaluators: trained in {manifest['train_seconds']:.0f}s, held-out {_acc_text(acc)}")
    return Evaluators(vocab, features, clip, manifest)


def _acc_text(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in acc.items())


def _batches(n: int, cfg: EvaluatorConfig, gen: torch.Generator):
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - cfg.batch_size // 4, cfg.batch_size):
            yield perm[i : i + cfg.batch_size]


def _fit_features(net: FeatureNet, x_NCHW, y_NK, cfg: EvaluatorConfig) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    net.train()
    for idx in _batches(len(x_NCHW), cfg, gen):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            net.label_logits(_augment(x_NCHW[idx], gen)), y_NK[idx]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _fit_clip(net: ContrastiveNet, x_NCHW, ids_NL, cfg: EvaluatorConfig) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    net.train()
    for idx in _batches(len(x_NCHW), cfg, gen):
        loss = net.loss(_augment(x_NCHW[idx], gen), ids_NL[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _augment(x_NCHW: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild pixel noise, so the features do not hinge on exact flat colours."""
    return (x_NCHW + 0.02 * torch.randn(x_NCHW.shape, generator=gen)).clamp(0, 1)


@torch.no_grad()
def feature_accuracy(net: FeatureNet, x_NCHW, y_NK) -> dict[str, float]:
    """Held-out label-word accuracy (per word), the majority-class baseline and macro F1."""
    pred_NK = (net.label_logits(x_NCHW) > 0).float()
    majority_K = (y_NK.mean(0) > 0.5).float()
    tp = (pred_NK * y_NK).sum(0)
    f1_K = 2 * tp / (pred_NK.sum(0) + y_NK.sum(0)).clamp_min(1.0)
    present_K = y_NK.sum(0) > 0
    return {
        "label_accuracy": float((pred_NK == y_NK).float().mean()),
        "label_majority_accuracy": float((majority_K == y_NK).float().mean()),
        "label_macro_f1": float(f1_K[present_K].mean()) if present_K.any() else 0.0,
    }


@torch.no_grad()
def retrieval_accuracy(net: ContrastiveNet, x_NCHW, ids_NL) -> dict[str, float]:
    """Top-1 retrieval accuracy within groups of 32 held-out pairs, both directions."""
    img_ND, txt_ND = net.embed_images(x_NCHW), net.embed_texts(ids_NL)
    hits_i2t = hits_t2i = total = 0
    for i in range(0, len(img_ND), RETRIEVAL_GROUP):
        sim_GG = img_ND[i : i + RETRIEVAL_GROUP] @ txt_ND[i : i + RETRIEVAL_GROUP].T
        target_G = torch.arange(len(sim_GG))
        hits_i2t += int((sim_GG.argmax(1) == target_G).sum())
        hits_t2i += int((sim_GG.argmax(0) == target_G).sum())
        total += len(sim_GG)
    chance = sum(
        1 / min(RETRIEVAL_GROUP, len(img_ND) - i) for i in range(0, len(img_ND), RETRIEVAL_GROUP)
    )
    return {
        "retrieval_i2t_top1": hits_i2t / total,
        "retrieval_t2i_top1": hits_t2i / total,
        "retrieval_chance": chance * RETRIEVAL_GROUP / total if total else 0.0,
    }


def load_evaluators(path: str | Path) -> Evaluators:
    """Load an evaluator folder; a missing or damaged one raises :class:`EvaluatorError`."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != FORMAT:
            raise EvaluatorError(f"{path}: not an evaluator folder of format {FORMAT}")
        vocab = WordVocab.from_dict(manifest["vocab"])
        cfg, size = manifest["config"], int(manifest["image_size"])
        features = FeatureNet(len(vocab.labels), int(cfg["dim"]), size)
        clip = ContrastiveNet(vocab.size, int(cfg["dim"]), size)
        features.load_state_dict(load_file(str(path / "features.safetensors")))
        clip.load_state_dict(load_file(str(path / "clip.safetensors")))
    except EvaluatorError:
        raise
    except Exception as e:  # missing files, bad JSON, wrong shapes: all mean "damaged"
        raise EvaluatorError(f"{path}: cannot load the evaluator networks ({e})") from e
    return Evaluators(vocab, features.eval(), clip.eval(), manifest, path)


def _save_atomically(ev: Evaluators, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        save_file(
            {k: v.contiguous() for k, v in ev.features.state_dict().items()},
            str(tmp / "features.safetensors"),
        )
        save_file(
            {k: v.contiguous() for k, v in ev.clip.state_dict().items()},
            str(tmp / "clip.safetensors"),
        )
        (tmp / "manifest.json").write_text(json.dumps(ev.manifest, indent=1) + "\n")
        tmp.replace(final)
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

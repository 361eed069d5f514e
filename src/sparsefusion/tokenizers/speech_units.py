"""Speech tokenizer: waveform -> log-mel frames -> k-means units (~25 per second) and back.

Features: a Hann-window STFT (``torch.stft``, no torchaudio) with hop ``SAMPLE_RATE /
units_per_second`` (640 samples = 40 ms at 16 kHz, so one unit per frame, 25 Hz as in the MoT
paper's speech setting, spec section 5.4b), an HTK mel filterbank and ``log(mel + 1e-5)``, then
per-dimension standardisation. Units: a k-means codebook (``num_units`` centroids, 500 by default)
trained by the project with Lloyd iterations (random data-point initialisation, empty clusters
re-seeded with the worst-fit frames). Decoding: each unit's centroid log-mel frame -> mel
magnitudes -> linear magnitudes through the filterbank's pseudo-inverse -> Griffin-Lim phase
reconstruction (``torch.istft``), so generated units can be listened to. Semantic quality is far
from DinoSR/HuBERT units; the point is a working, trainable third modality.

Shape legend: S = samples, F = frames (= units), M = mel bins, Q = linear frequency bins,
K = number of units, N = frames pooled for training.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparsefusion.data.audio import SAMPLE_RATE


@dataclass(kw_only=True)
class SpeechUnitsConfig:
    """Speech unit tokenizer settings.

    Attributes:
        num_units: k-means codebook size K (the paper's speech vocabulary is 500).
        units_per_second: frame rate of the units (hop = 16000 / units_per_second samples).
        n_fft: STFT size (and window length) in samples.
        n_mels: mel bins per frame.
        kmeans_iters: Lloyd iterations.
        max_train_frames: frames sampled from the training clips (a cap on k-means cost).
        griffin_lim_iters: phase-reconstruction iterations when decoding.
        seed: seed of the k-means initialisation and of frame sampling.
    """

    num_units: int = 500
    units_per_second: int = 25
    n_fft: int = 1024
    n_mels: int = 80
    kmeans_iters: int = 30
    max_train_frames: int = 100000
    griffin_lim_iters: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_units", "units_per_second", "n_fft", "n_mels", "max_train_frames"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"tokenizer.speech.{name} must be positive, got {getattr(self, name)}"
                )
        if SAMPLE_RATE % self.units_per_second:
            raise ValueError(
                f"tokenizer.speech.units_per_second must divide {SAMPLE_RATE}, "
                f"got {self.units_per_second}"
            )
        if self.hop > self.n_fft:
            raise ValueError(
                f"tokenizer.speech.n_fft ({self.n_fft}) must be >= the hop ({self.hop} samples)"
            )
        if self.kmeans_iters < 1 or self.griffin_lim_iters < 1:
            raise ValueError("tokenizer.speech.kmeans_iters/griffin_lim_iters must be >= 1")

    @property
    def hop(self) -> int:
        """Samples per unit."""
        return SAMPLE_RATE // self.units_per_second


def mel_filterbank(n_fft: int, n_mels: int, rate: int = SAMPLE_RATE) -> torch.Tensor:
    """HTK-style triangular mel filters, shape (M, Q) with Q = n_fft // 2 + 1."""

    def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs_Q = torch.linspace(0, rate / 2, n_fft // 2 + 1)
    mel_edges = torch.linspace(0.0, float(hz_to_mel(torch.tensor(rate / 2.0))), n_mels + 2)
    hz = mel_to_hz(mel_edges)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up_MQ = (freqs_Q[None] - lo) / (mid - lo)
    down_MQ = (hi - freqs_Q[None]) / (hi - mid)
    return torch.clamp(torch.minimum(up_MQ, down_MQ), min=0.0)


class SpeechUnitTokenizer:
    """Waveforms <-> unit ids in ``[0, num_units)``.

    Args:
        cfg: the settings.
        centroids_KM: standardized log-mel centroids (zeros for an untrained tokenizer).
        mean_M: feature mean used for standardisation.
        std_M: feature standard deviation.
    """

    def __init__(
        self,
        cfg: SpeechUnitsConfig,
        centroids_KM: torch.Tensor | None = None,
        mean_M: torch.Tensor | None = None,
        std_M: torch.Tensor | None = None,
    ) -> None:
        self.cfg = cfg
        M = cfg.n_mels
        self.centroids_KM = torch.zeros(cfg.num_units, M) if centroids_KM is None else centroids_KM
        self.mean_M = torch.zeros(M) if mean_M is None else mean_M
        self.std_M = torch.ones(M) if std_M is None else std_M
        if self.centroids_KM.shape != (cfg.num_units, M):
            raise ValueError(
                f"centroids shape {tuple(self.centroids_KM.shape)} != {(cfg.num_units, M)}"
            )
        self.fb_MQ = mel_filterbank(cfg.n_fft, M)
        self.window = torch.hann_window(cfg.n_fft)
        self._fb_pinv_QM: torch.Tensor | None = None  # computed on the first decode

    @property
    def codebook_size(self) -> int:
        return self.cfg.num_units

    # ---- features -----------------------------------------------------------------------------

    def _stft(self, wave_S: torch.Tensor) -> torch.Tensor:
        return torch.stft(
            wave_S.float(),
            self.cfg.n_fft,
            hop_length=self.cfg.hop,
            window=self.window,
            center=True,
            return_complex=True,
        )  # (Q, F)

    def log_mel(self, wave_S: torch.Tensor) -> torch.Tensor:
        """Log-mel frames of a waveform, shape (F, M), F = 1 + S // hop."""
        mag_QF = self._stft(wave_S).abs()
        return torch.log(self.fb_MQ @ mag_QF + 1e-5).t()

    def features(self, wave_S: torch.Tensor) -> torch.Tensor:
        """Standardized log-mel frames, shape (F, M)."""
        return (self.log_mel(wave_S) - self.mean_M) / self.std_M

    # ---- units --------------------------------------------------------------------------------

    def encode(self, waves: Sequence[torch.Tensor]) -> list[list[int]]:
        """Each waveform -> its unit ids (one per 40 ms frame at the default rate)."""
        return [nearest(self.features(w), self.centroids_KM).tolist() for w in waves]

    def decode(self, units: Sequence[int]) -> torch.Tensor:
        """Unit ids -> a waveform (centroid log-mel frames, then Griffin-Lim), shape (S,)."""
        ids_F = torch.tensor(list(units), dtype=torch.long)
        if ids_F.numel() == 0:
            return torch.zeros(0)
        if int(ids_F.min()) < 0 or int(ids_F.max()) >= self.cfg.num_units:
            raise ValueError(f"speech unit ids must be in [0, {self.cfg.num_units})")
        log_mel_FM = self.centroids_KM[ids_F] * self.std_M + self.mean_M
        return self.invert_log_mel(log_mel_FM)

    def invert_log_mel(self, log_mel_FM: torch.Tensor) -> torch.Tensor:
        """Log-mel frames -> waveform by filterbank pseudo-inverse and Griffin-Lim."""
        mel_MF = (log_mel_FM.exp() - 1e-5).clamp(min=0).t()
        if self._fb_pinv_QM is None:
            self._fb_pinv_QM = torch.linalg.pinv(self.fb_MQ)
        mag_QF = (self._fb_pinv_QM @ mel_MF).clamp(min=0)
        length = (mag_QF.shape[1] - 1) * self.cfg.hop
        gen = torch.Generator().manual_seed(self.cfg.seed)
        phase_QF = torch.rand(mag_QF.shape, generator=gen) * 2 * math.pi
        spec_QF = torch.polar(mag_QF, phase_QF)
        for _ in range(self.cfg.griffin_lim_iters):
            wave_S = self._istft(spec_QF, length)
            spec_QF = torch.polar(mag_QF, torch.angle(self._stft(wave_S)))
        wave_S = self._istft(spec_QF, length)
        return wave_S / wave_S.abs().max().clamp(min=1e-3) * 0.8

    def _istft(self, spec_QF: torch.Tensor, length: int) -> torch.Tensor:
        return torch.istft(
            spec_QF,
            self.cfg.n_fft,
            hop_length=self.cfg.hop,
            window=self.window,
            center=True,
            length=length,
        )

    # ---- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``<path>`` (safetensors: centroids, mean, std) and ``<path>.json`` (config)."""
        p = Path(path)
        tensors = {"centroids_KM": self.centroids_KM, "mean_M": self.mean_M, "std_M": self.std_M}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(p))
        p.with_suffix(".json").write_text(json.dumps(asdict(self.cfg), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SpeechUnitTokenizer:
        """Inverse of :meth:`save`."""
        p = Path(path)
        cfg = SpeechUnitsConfig(**json.loads(p.with_suffix(".json").read_text("utf-8")))
        t = load_file(str(p))
        return cls(cfg, t["centroids_KM"], t["mean_M"], t["std_M"])


def nearest(x_NM: torch.Tensor, c_KM: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest centroid of every row (squared Euclidean), chunked over rows."""
    c2_K = c_KM.pow(2).sum(1)
    out = [
        (c2_K - 2 * x_NM[i : i + chunk] @ c_KM.t()).argmin(dim=1)
        for i in range(0, x_NM.shape[0], chunk)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def kmeans(x_NM: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means; returns centroids (K, M). Empty clusters take the worst-fit rows."""
    n = x_NM.shape[0]
    pick = torch.randperm(n, generator=gen)[:k]
    if n < k:  # fewer frames than units: repeat frames (with jitter so the units stay distinct)
        pick = torch.randint(0, n, (k,), generator=gen)
    c_KM = x_NM[pick].clone() + 1e-3 * torch.randn(k, x_NM.shape[1], generator=gen)
    for _ in range(iters):
        a_N = nearest(x_NM, c_KM)
        counts_K = torch.bincount(a_N, minlength=k)
        sums_KM = torch.zeros_like(c_KM).index_add_(0, a_N, x_NM)
        full = counts_K > 0
        c_KM = torch.where(full[:, None], sums_KM / counts_K.clamp(min=1)[:, None], c_KM)
        empty = (~full).nonzero().flatten()
        if empty.numel():  # host sync is fine here: offline training, not a hot path
            err_N = (x_NM - c_KM[a_N]).pow(2).sum(1)
            worst = err_N.topk(min(empty.numel(), n)).indices
            c_KM[empty[: worst.numel()]] = x_NM[worst]
    return c_KM


def train_speech_units(
    cfg: SpeechUnitsConfig, waves: Sequence[torch.Tensor]
) -> tuple[SpeechUnitTokenizer, dict[str, Any]]:
    """Fit the standardisation and the k-means codebook on the frames of ``waves``.

    Returns:
        The tokenizer and a report (frames, seconds, usage = fraction of units used, mse).
    """
    if not waves:
        raise ValueError("train_speech_units needs at least one waveform")
    t0 = time.perf_counter()
    tok = SpeechUnitTokenizer(cfg)
    frames_NM = torch.cat([tok.log_mel(w) for w in waves])
    gen = torch.Generator().manual_seed(cfg.seed)
    if frames_NM.shape[0] > cfg.max_train_frames:
        frames_NM = frames_NM[
            torch.randperm(frames_NM.shape[0], generator=gen)[: cfg.max_train_frames]
        ]
    mean_M, std_M = frames_NM.mean(0), frames_NM.std(0).clamp(min=1e-3)
    x_NM = (frames_NM - mean_M) / std_M
    c_KM = kmeans(x_NM, cfg.num_units, cfg.kmeans_iters, gen)
    a_N = nearest(x_NM, c_KM)
    report = {
        "frames": int(x_NM.shape[0]),
        "usage": float((torch.bincount(a_N, minlength=cfg.num_units) > 0).float().mean()),
        "mse": float((x_NM - c_KM[a_N]).pow(2).mean()),
        "train_seconds": time.perf_counter() - t0,
    }
    return SpeechUnitTokenizer(cfg, c_KM, mean_M, std_M), report

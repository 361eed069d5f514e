"""Speech units: log-mel at 25 frames a second, k-means units, Griffin-Lim decode, and speech in
the multimodal tokenizer (encode/decode, save/load)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefusion.data.audio import SAMPLE_RATE, read_wav, resample, write_wav
from sparsefusion.data.documents import IMAGE, SPEECH, TEXT, Document, Segment
from sparsefusion.tokenizers.image_vq import ImageVQConfig, VQImageTokenizer
from sparsefusion.tokenizers.multimodal import MultimodalTokenizer
from sparsefusion.tokenizers.speech_units import (
    SpeechUnitsConfig,
    SpeechUnitTokenizer,
    train_speech_units,
)
from sparsefusion.tokenizers.text_bpe import BPETextTokenizer
from sparsefusion.tokenizers.vocab import UnifiedVocab


def _tones(freqs, seconds=0.4):
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return torch.cat([0.5 * torch.sin(2 * math.pi * f * t) for f in freqs])


@pytest.fixture(scope="module")
def units():
    cfg = SpeechUnitsConfig(num_units=8, kmeans_iters=20, griffin_lim_iters=16)
    clips = [_tones([200, 500, 1200, 3000]), _tones([3000, 200]), _tones([800, 500])]
    tok, report = train_speech_units(cfg, clips)
    return tok, report


def test_speech_features_run_at_25_frames_per_second():
    tok = SpeechUnitTokenizer(SpeechUnitsConfig(num_units=4))
    assert tok.log_mel(torch.zeros(SAMPLE_RATE * 2)).shape == (51, 80)  # 1 + S // 640
    with pytest.raises(ValueError, match="tokenizer.speech.units_per_second"):
        SpeechUnitsConfig(units_per_second=7)


def test_units_separate_tones_and_round_trip(units):
    tok, report = units
    assert report["usage"] >= 0.5 and report["frames"] > 50
    clip = _tones([200, 1200, 3000])
    ids = tok.encode([clip])[0]
    assert len(ids) == 1 + clip.numel() // 640
    first, middle, last = ids[2], ids[len(ids) // 2], ids[-3]
    assert len({first, middle, last}) == 3  # three tones, three different units
    wave = tok.decode(ids)
    assert wave.shape == ((len(ids) - 1) * 640,) and float(wave.abs().max()) > 0.1
    again = tok.encode([wave])[0]
    agree = sum(a == b for a, b in zip(ids[1:-1], again[1:-1], strict=True)) / (len(ids) - 2)
    assert agree > 0.7  # the decoded audio maps back to (mostly) the same units
    # ... and its spectrum is the tones': energy peaks at the right mel bins.
    a, b = tok.log_mel(clip), tok.log_mel(wave)
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.6


def test_wav_io_and_resampling(tmp_path):
    clip = _tones([440], seconds=0.25)
    write_wav(tmp_path / "a.wav", clip)
    back = read_wav(tmp_path / "a.wav")
    assert back.shape == clip.shape and torch.allclose(back, clip, atol=1e-4)
    assert resample(clip, SAMPLE_RATE, 8000).numel() == clip.numel() // 2
    write_wav(tmp_path / "b.wav", clip, rate=22050)
    assert abs(read_wav(tmp_path / "b.wav").numel() - clip.numel() * 16000 / 22050) <= 1


def test_multimodal_tokenizer_with_speech(units, tmp_path):
    speech, _ = units
    text = BPETextTokenizer.train(["a tone and a square"] * 4, 260)
    image = VQImageTokenizer(ImageVQConfig(image_size=8, downsample=4, codebook_size=4)).eval()
    sizes = {TEXT: text.vocab_size, IMAGE: 4, SPEECH: 8}
    tok = MultimodalTokenizer(text, image, UnifiedVocab(sizes), speech)
    assert tok.modalities == ["text", "image", "speech"]
    clip = _tones([200, 3000])
    doc = Document([Segment(TEXT, "a tone"), Segment(SPEECH, clip)])
    ids, mods = tok.encode_document(doc)
    v = tok.vocab
    assert ids[len(text.encode("a tone")) + 1] == v.boa_id and ids[-2] == v.eoa_id
    assert mods.count(2) == 1 + clip.numel() // 640
    segs = tok.decode(ids)
    assert [s.modality for s in segs] == ["text", "speech"] and segs[0].payload == "a tone"
    tok.save(tmp_path / "tok")
    back = MultimodalTokenizer.load(tmp_path / "tok")
    assert back.speech is not None and back.encode_document(doc) == (ids, mods)
    with pytest.raises(ValueError, match="modalities"):
        MultimodalTokenizer(text, image, UnifiedVocab(sizes))  # speech vocab, no speech tokenizer
    two = MultimodalTokenizer(text, image, UnifiedVocab({TEXT: text.vocab_size, IMAGE: 4}))
    with pytest.raises(ValueError, match="speech"):
        two.encode_document(doc)

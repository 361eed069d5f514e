"""UnifiedVocab: id ranges, conversions, vectorised modality lookup, serialisation."""

import pytest
import torch

from sparsefusion.tokenizers.vocab import NUM_SPECIAL_SLOTS, SPECIAL_TOKENS, UnifiedVocab


def _vocab() -> UnifiedVocab:
    return UnifiedVocab({"text": 100, "image": 32})


def test_tok_vocab_ranges_and_specials():
    v = _vocab()
    assert v.modalities == ["text", "image"]
    assert v.offset("text") == NUM_SPECIAL_SLOTS == 16
    assert v.offset("image") == 116
    assert v.size == 148
    assert v.padded_size() == 192 and v.padded_size(4) == 148 and v.padded_size(50) == 150
    ids = [v.pad_id, v.bos_id, v.eos_id, v.boi_id, v.eoi_id, v.boa_id, v.eoa_id]
    assert ids == list(range(7))
    assert [v.special_id(t) for t in SPECIAL_TOKENS] == ids
    assert v.modality_index("image") == 1


def test_tok_vocab_conversions():
    v = _vocab()
    assert v.to_global("image", [0, 31]) == [116, 147]
    assert v.to_local("text", [16, 115]) == [0, 99]
    t = torch.tensor([[0, 5], [7, 31]])
    assert torch.equal(v.to_local("image", v.to_global("image", t)), t)
    with pytest.raises(ValueError):
        v.to_global("image", [32])
    with pytest.raises(ValueError):
        v.to_local("text", [116])
    with pytest.raises(ValueError, match="unknown modality"):
        v.offset("speech")


def test_tok_vocab_modality_of():
    v = UnifiedVocab({"text": 10, "image": 5, "speech": 3})
    ids = torch.tensor([[0, 1, 6, 15, 16, 25], [26, 30, 31, 33, 4, 2]])
    expected = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 1, 2, 2, 0, 0]])
    assert torch.equal(v.modality_of(ids), expected)
    assert v.modality_of(ids).dtype == torch.long


def test_tok_vocab_dict_round_trip_and_validation():
    v = _vocab()
    w = UnifiedVocab.from_dict(v.to_dict())
    assert w == v and w.size == v.size and w.modalities == v.modalities
    with pytest.raises(ValueError, match="start with 'text'"):
        UnifiedVocab({"image": 4, "text": 4})
    with pytest.raises(ValueError, match="image"):
        UnifiedVocab({"text": 4, "image": 0})
    bad = v.to_dict() | {"special_tokens": ["<pad>"]}
    with pytest.raises(ValueError, match="special-token layout"):
        UnifiedVocab.from_dict(bad)

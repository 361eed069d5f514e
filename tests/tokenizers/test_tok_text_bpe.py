"""Byte-level BPE: exact round trip on any string, save/load."""

import pytest

from sparsefusion.tokenizers.text_bpe import BPETextTokenizer

CORPUS = [
    "A red circle is left of a blue square.",
    "Two green triangles above one yellow cross.",
    "The scene has a white background and a small purple circle.",
] * 30

HARD = [
    "",
    " leading and trailing spaces  ",
    "tabs\tnew\nlines\r\n and  double  spaces",
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f600\U0001f3a8 e\u0301",
    "\x00\x01 control \ufffd and unseen words: zyxwvut",
]


@pytest.fixture(scope="module")
def bpe() -> BPETextTokenizer:
    return BPETextTokenizer.train(CORPUS, vocab_size=300)


def test_tok_bpe_round_trip_unicode(bpe):
    assert 256 < bpe.vocab_size <= 300
    for s in CORPUS[:3] + HARD:
        ids = bpe.encode(s)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == s
    # merges were learned: frequent text compresses below one id per byte
    assert len(bpe.encode(CORPUS[0])) < 0.6 * len(CORPUS[0].encode("utf-8"))
    assert bpe.encode_batch(HARD) == [bpe.encode(s) for s in HARD]


def test_tok_bpe_save_load(bpe, tmp_path):
    bpe.save(tmp_path / "text.json")
    again = BPETextTokenizer.load(tmp_path / "text.json")
    assert again.vocab_size == bpe.vocab_size
    for s in HARD:
        assert again.encode(s) == bpe.encode(s)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid BPE"):
        BPETextTokenizer.load(tmp_path / "bad.json")


def test_tok_bpe_errors(bpe):
    with pytest.raises(ValueError, match="vocab_size"):
        BPETextTokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="outside"):
        bpe.decode([bpe.vocab_size])

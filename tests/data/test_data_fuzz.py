"""Property tests for JSONL records (issue 28 build item 4): arbitrary Unicode (surrogates and
control characters included), arbitrary segment types and nesting, raw undecodable bytes.

The property: every line is a document whose segments are all usable, or a ``BadInput`` naming
``file:line`` (counted by the loader, which always finishes its batch); a prompts file gives
requests or a ``ValueError`` naming ``file:line``. Never another exception, a hang or a silent
loss. ``SPARSEFUSION_FUZZ_EXAMPLES`` raises the example count (``benchmarks/fuzz_inputs.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from sparsefusion.data.audio import write_wav
from sparsefusion.data.documents import IMAGE, SPEECH, TEXT
from sparsefusion.data.issues import REASONS, BadInput
from sparsefusion.data.jsonl_source import JsonlSource
from sparsefusion.data.loader import PackedLoader
from sparsefusion.data.text import text_problem
from sparsefusion.generate.prompts import read_prompts
from sparsefusion.generate.request import GenerationRequest
from sparsefusion.tokenizers.text_bpe import BPETextTokenizer

EXAMPLES = int(os.environ.get("SPARSEFUSION_FUZZ_EXAMPLES", "60"))
SEED = int(os.environ.get("SPARSEFUSION_FUZZ_SEED", "28"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

# Any code point, lone surrogates and C0/C1 controls included.
TEXT_ANY = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
PATHS = st.sampled_from(["img/red.png", "wav/tone.wav", "missing.png", "missing.wav", "", ".",
                         "img", "/dev/null", "img/red.png\x00x", "../x.png"])  # fmt: skip
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True), TEXT_ANY)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(TEXT_ANY, inner, max_size=3)
    ),
    max_leaves=8,
)
SEGMENT = st.one_of(
    st.builds(lambda t: {"text": t}, TEXT_ANY),
    st.builds(lambda p: {"image": p}, st.one_of(PATHS, TEXT_ANY)),
    st.builds(lambda p: {"audio": p}, st.one_of(PATHS, TEXT_ANY)),
    st.dictionaries(
        st.one_of(st.sampled_from(["text", "image", "audio", "video"]), TEXT_ANY),
        VALUES,
        max_size=3,
    ),  # fmt: skip
    VALUES,
)
SEGMENTS = st.lists(SEGMENT, max_size=4)
OPTIONS = st.dictionaries(
    st.sampled_from(["num_samples", "seed", "mode", "temperature", "id", "max_num_samples"]),
    VALUES, max_size=2,
)  # fmt: skip
LINE = st.one_of(
    st.builds(lambda s: json.dumps(s), SEGMENTS),
    st.builds(lambda s, o: json.dumps({"segments": s, **o}), SEGMENTS, OPTIONS),
    st.builds(
        lambda s: json.dumps(s, ensure_ascii=False).encode("utf-8", "surrogatepass"), SEGMENTS
    ),  # raw surrogate bytes: invalid UTF-8  # fmt: skip
    st.builds(lambda v: json.dumps(v), VALUES),
    TEXT_ANY.map(lambda t: t.replace("\n", " ").encode("utf-8", "surrogatepass")),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b" ")),
)
GOOD = json.dumps([{"text": "a red square"}, {"image": "img/red.png"}])


def _write(folder: Path, lines: list[str | bytes]) -> Path:
    if not (folder / "img").is_dir():
        (folder / "img").mkdir()
        (folder / "wav").mkdir()
        Image.new("RGB", (8, 8), "red").save(folder / "img" / "red.png")
        write_wav(folder / "wav" / "tone.wav", torch.sin(torch.arange(4000) / 5.0) / 2)
    path = folder / "d.jsonl"
    raw = [x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines]
    path.write_bytes(b"\n".join([*raw, GOOD.encode()]) + b"\n")
    return path


class _Tok:
    """Text through the real byte-level BPE (whose TypeError on surrogates started issue 28);
    an image or a clip is two fixed ids."""

    modalities = [TEXT, IMAGE, SPEECH]
    bpe = BPETextTokenizer.train(["a red square", "the blue circle"] * 4, 260)

    def encode_documents(self, docs):
        out = []
        for d in docs:
            ids = [1]
            for s in d.segments:
                ids += self.bpe.encode(s.payload) if s.modality == TEXT else [3, 4]
            out.append(([*ids, 2], [0] * (len(ids) + 1)))
        return out


def _non_blank(lines: list[str | bytes]) -> int:
    raw = [x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines]
    return sum(1 for x in raw if x.strip())


def _fresh(factory) -> Path:
    return factory.mktemp("fuzz")


@seed(SEED)
@FUZZ
@given(lines=st.lists(LINE, min_size=1, max_size=6))
def test_every_jsonl_line_is_a_usable_document_or_a_named_bad_input(tmp_path_factory, lines):
    path = _write(_fresh(tmp_path_factory), lines)
    src = JsonlSource(str(path), val_fraction=0.0)
    assert len(src) == _non_blank(lines) + 1  # no line merged or dropped (blank: ignored)
    skipped = 0
    for i in range(len(src)):
        try:
            doc = src.document(i)
        except BadInput as e:
            assert e.reason in REASONS and e.where.startswith("d.jsonl:")
            skipped += 1
            continue
        assert doc.segments and all(s.modality in (TEXT, IMAGE, SPEECH) for s in doc.segments)
        assert all(text_problem(s.payload) is None for s in doc.segments if s.modality == TEXT)
        if any(s.modality == SPEECH for s in doc.segments):
            assert SPEECH in src.modalities  # declared by structure, as the tokenizer needs
    loader = PackedLoader(src, _Tok(), seq_len=8, batch_size=1, docs_per_chunk=len(src))
    loader.next_batch()  # finishes: the good last line always feeds it
    assert loader.issues.total == skipped


@seed(SEED)
@FUZZ
@given(lines=st.lists(LINE, min_size=1, max_size=4))
@example(lines=['[{"image": "\\n"}]'])  # found by the fuzz: a newline in a path broke the line
def test_a_prompts_file_gives_requests_or_an_error_naming_its_line(tmp_path_factory, lines):
    path = _write(_fresh(tmp_path_factory), lines)
    try:
        requests = read_prompts(path, GenerationRequest(), 16)
    except ValueError as e:
        assert "d.jsonl:" in str(e) and "\n" not in str(e)
        return
    assert len(requests) == _non_blank(lines) + 1
    for r in requests:
        assert text_problem(r.prompt) is None

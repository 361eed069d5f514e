"""The text and JSONL-structure boundaries (issue 28 items 1 and 2).

Text: a lone UTF-16 surrogate cannot be encoded, so the record is skipped and counted
(``bad_text``) by every dataset reader and refused with ``file:line`` in a prompts file.
Structure: speech is declared by an ``{"audio": ...}`` segment, never by the bytes ``"audio"``,
and a dataset whose clips are all unreadable trains without speech.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from sparsefusion.cli.main import main as cli_main
from sparsefusion.data.documents import IMAGE, SPEECH, TEXT, Document, Segment
from sparsefusion.data.issues import BadInput
from sparsefusion.data.jsonl_source import JsonlSource
from sparsefusion.data.loader import PackedLoader
from sparsefusion.data.text import check_text, read_document
from sparsefusion.generate.prompts import read_prompts
from sparsefusion.generate.request import GenerationRequest
from sparsefusion.tokenizers.build import TokenizerConfig, load_or_train_tokenizer
from sparsefusion.tokenizers.text_bpe import BPETextTokenizer

SURROGATE_LINE = '[{"text": "bad \\ud800 x"}]'  # JSON escape: parses to a lone surrogate
WORDS = ["a red square on a mat", "the blue circle is small", "green and yellow shapes"]


def _text_jsonl(folder: Path, n: int = 30) -> Path:
    lines = [json.dumps([{"text": f"{WORDS[i % 3]} number {i}."}]) for i in range(n)]
    lines.insert(3, SURROGATE_LINE)
    path = folder / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_surrogate_rule_names_place_and_offset():
    with pytest.raises(BadInput, match=r"x.jsonl:4: .*U\+D800 at character 4 \(bad_text\)"):
        check_text("bad \ud800 x", "x.jsonl:4")
    fine = "tab\t nul\x00 bell\x07 ok \U0001f600"
    assert check_text(fine, "w") == fine


def test_jsonl_surrogate_is_bad_text_naming_the_line(tmp_path):
    src = JsonlSource(str(_text_jsonl(tmp_path)), val_fraction=0.0)
    with pytest.raises(BadInput) as e:
        src.document(3)
    assert e.value.reason == "bad_text" and e.value.where == "docs.jsonl:4"
    meta_line = tmp_path / "meta.jsonl"
    meta_line.write_text('{"segments": [{"text": "ok"}], "id": "\\udc80"}\n')
    with pytest.raises(BadInput, match="bad_text"):
        JsonlSource(str(meta_line), val_fraction=0.0).document(0)


def test_text_tokenizer_refuses_surrogates_with_a_value_error():
    tok = BPETextTokenizer.train(WORDS * 5, 260)
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("bad \ud800")
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode_batch(["fine", "bad \udfff"])


class _CustomSource:
    """A user source that hands out a surrogate (no JSONL parser in between)."""

    name = "custom"
    modalities = [TEXT]

    def __len__(self) -> int:
        return 8

    def fingerprint(self) -> str:
        return "custom"

    def document(self, index: int) -> Document:
        text = "bad \ud800" if index == 2 else f"{WORDS[index % 3]} {index}"
        return Document([Segment(TEXT, text)], {"where": f"custom[{index}]"})


def test_packed_loader_skips_and_counts_surrogate_text_of_any_source():
    loader = PackedLoader(_CustomSource(), _Encoder(), seq_len=8, batch_size=1, docs_per_chunk=8)
    loader.next_batch()
    assert loader.issues.counts == {"bad_text": 1}


class _Encoder:
    """Minimal tokenizer: bytes of the text (raises TypeError on surrogates, like HF's)."""

    modalities = [TEXT]

    def encode_documents(self, docs):
        out = []
        for d in docs:
            ids = [1, *(b % 60 + 3 for b in d.segments[0].payload.encode("utf-8")), 2]
            out.append((ids, [0] * len(ids)))
        return out


def test_tokenizer_training_and_train_skip_and_count_the_record(tmp_path, tokenizer_cache):
    from sparsefusion.runs.folder import read_metrics
    from sparsefusion.runs.presets import resolve_config
    from sparsefusion.train.trainer import train

    path = _text_jsonl(tmp_path)
    run = tmp_path / "run"
    cfg = resolve_config(
        "mot-debug",
        [f"run.dir={run}", f"tokenizer.cache_dir={tokenizer_cache}", f"data.path={path}",
         "data.val_fraction=0.1", "data.val_batches=1", "train.steps=2", "run.log_every=2",
         "run.progress=log", "train.threads=1", "tokenizer.text_vocab_size=260"],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)
    row = [r for r in read_metrics(run / "metrics.jsonl") if "split" not in r][-1]
    assert row["step"] == 2 and row["data/skipped/bad_text"] >= 1  # once per epoch read
    assert "docs.jsonl:4" in (run / "train.log").read_text()


def test_data_tokenize_records_the_surrogate_as_skipped(tmp_path, tokenizer_cache):
    path = _text_jsonl(tmp_path)
    out = tmp_path / "tokens"
    argv = ["data", "tokenize", str(path), "--out", str(out), "--preset", "mot-debug", "--quiet",
            "data.val_fraction=0", "tokenizer.text_vocab_size=260",
            f"tokenizer.cache_dir={tokenizer_cache}"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["skipped"] == {"bad_text": 1}


def test_prompts_file_with_a_surrogate_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('[{"text": "fine"}]\n' + SURROGATE_LINE + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: .*surrogate"):
        read_prompts(path, GenerationRequest(), 32)


# ---- JSONL structure: modality from parsed segments only -------------------------------------


def _image(folder: Path, name: str) -> str:
    (folder / "img").mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), name).save(folder / "img" / f"{name}.png")
    return f"img/{name}.png"


@pytest.mark.parametrize(
    "line",
    [
        [{"text": "audio"}],
        {"segments": [{"text": "a clip"}], "audio": "clip.wav"},
        [{"text": "x", "audio": "clip.wav"}],  # not a one-key segment: unknown, not speech
    ],
)
def test_the_bytes_audio_do_not_declare_speech(tmp_path, line):
    path = tmp_path / "d.jsonl"
    red = _image(tmp_path, "red")
    path.write_text(json.dumps(line) + "\n" + json.dumps([{"text": "t"}, {"image": red}]) + "\n")
    assert JsonlSource(str(path), val_fraction=0.0).modalities == [TEXT, IMAGE]


def test_an_audio_segment_declares_speech(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"segments": [{"text": "t"}, {"audio": "a.wav"}]}) + "\n")
    assert JsonlSource(str(path), val_fraction=0.0).modalities == [TEXT, IMAGE, SPEECH]


def test_text_audio_and_a_missing_clip_still_train_a_tokenizer(tmp_path):
    lines = [[{"text": "audio"}, {"image": _image(tmp_path, c)}] for c in ("red", "blue")]
    lines += [[{"text": f"{w}."}, {"image": _image(tmp_path, "green")}] for w in WORDS]
    lines.append([{"text": "a tone"}, {"audio": "wav/missing.wav"}])
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    src = JsonlSource(str(path), val_fraction=0.0)
    cfg = TokenizerConfig(cache_dir=str(tmp_path / "cache"), text_vocab_size=260)
    cfg.image.train_steps, cfg.image.held_out, cfg.image.batch_size = 2, 1, 2
    with pytest.warns(UserWarning, match="no readable clip"):
        tok = load_or_train_tokenizer(cfg, src, progress=False, log=lambda _: None)
    assert SPEECH not in tok.modalities
    loader = PackedLoader(src, tok, seq_len=16, batch_size=1, docs_per_chunk=len(src))
    loader.next_batch()
    assert loader.issues.counts == {"missing_file": 1}


def test_speech_segment_for_a_tokenizer_without_speech_is_a_counted_skip():
    class _Speechy(_CustomSource):
        def document(self, index: int) -> Document:
            return Document([Segment(TEXT, "t"), Segment(SPEECH, None)], {"where": "s"})

    with pytest.raises(BadInput, match="unknown_segment"):
        read_document(_Speechy(), 0, [TEXT, IMAGE])


def test_a_run_trained_with_a_relative_tokenizer_path_generates_from_elsewhere(
    tmp_path, monkeypatch, tokenizer_cache
):
    from sparsefusion.runs.presets import resolve_config
    from sparsefusion.train.trainer import train

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    path = _text_jsonl(here)
    monkeypatch.chdir(here)
    cfg = TokenizerConfig(cache_dir=tokenizer_cache, text_vocab_size=260)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_or_train_tokenizer(cfg, JsonlSource(str(path)), progress=False).save("tok")
        run = tmp_path / "run"
        train(resolve_config("mot-debug", [
            f"run.dir={run}", "tokenizer.path=tok", "data.path=docs.jsonl", "train.steps=2",
            "data.val_batches=1", "train.threads=1", "run.progress=log"]))  # fmt: skip
    monkeypatch.chdir(elsewhere)
    argv = ["generate", str(run), "--prompt", "a red", "--max-new-tokens", "4", "--out", "s"]
    assert cli_main(argv) == 0
    assert (elsewhere / "s" / "index.html").is_file()

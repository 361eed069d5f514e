"""The whole path: a run folder, aux routers, an overfit model reproducing its documents."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from generate_archs import DOCS, tiny_generator_model, tiny_tokenizer
from PIL import Image
from safetensors.torch import save_file

from sparsefusion.checkpoint.store import save_checkpoint
from sparsefusion.config import to_dict
from sparsefusion.data.documents import IMAGE, TEXT, Document, Segment
from sparsefusion.generate import GenerationRequest, Generator, MissingAuxRouters, write_samples
from sparsefusion.generate.engine import sequence_inputs
from sparsefusion.runs.config import TrainConfig


def _write_run(tmp_path, tok, model, aux=None):
    tok.save(tmp_path / "tok")
    cfg = TrainConfig()
    cfg.model = model.cfg
    cfg.tokenizer.path = str(tmp_path / "tok")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    buffer = {"ids": [], "modality": [], "position": [], "document": []}
    loader = {"version": 1, "rank": 0, "world_size": 1, "docs_read": 0, "tokens_emitted": 0}
    state = {"tokens": 0, "flops": 0, "loader": {**loader, "buffer": buffer}}
    save_checkpoint(run, 10, model, torch.optim.SGD(model.parameters(), lr=0.1), state)
    if aux is not None:
        (run / "aux_routers").mkdir()
        save_file(dict(aux.state_dict()), str(run / "aux_routers" / "aux_routers.safetensors"))
    return run


def test_batch_routed_run_needs_aux_routers(tmp_path):
    tok = tiny_tokenizer()
    model, aux = tiny_generator_model(tok, "moe_ec")
    run = _write_run(tmp_path, tok, model)
    with pytest.raises(MissingAuxRouters, match=f"sparsefusion train-aux {run}"):
        Generator.from_run(run)
    (run / "aux_routers").mkdir()
    save_file(dict(aux.state_dict()), str(run / "aux_routers" / "aux_routers.safetensors"))
    gen = Generator.from_run(run)
    assert gen.modes == ["text", "text_to_image", "image_to_text", "interleaved"]
    out = gen.generate([GenerationRequest(prompt="A green", max_new_tokens=5, seed=1)])
    assert out[0].new_tokens == 5
    with pytest.raises(ValueError, match="text_to_speech.*no speech tokenizer"):
        GenerationRequest(mode="text_to_speech").validate(gen)


def _overfit(tok, docs):
    model, _ = tiny_generator_model(tok, "mot", dim=64, init_std=0.02)
    ids = [i for d in docs for i in tok.encode_document(d)[0]]
    inputs = sequence_inputs(model, tok.vocab, ids)
    target = torch.tensor(ids[1:])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(inputs).logits_BTV[0, :-1], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval()


def test_overfit_model_reproduces_its_documents(tmp_path):
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    pics = [Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).byte().numpy()) for _ in "ab"]
    docs = [
        Document([Segment(TEXT, DOCS[0])]),
        Document([Segment(TEXT, DOCS[1])]),
        Document([Segment(TEXT, DOCS[2]), Segment(IMAGE, pics[0])]),
        Document([Segment(IMAGE, pics[1]), Segment(TEXT, DOCS[3])]),
    ]
    model = _overfit(tok, docs)
    gen = Generator(model, tok)
    words = DOCS[0].split()
    codes = tok.image.encode(pics).tolist()
    reqs = [
        GenerationRequest(prompt=" ".join(words[:3]), temperature=0, max_new_tokens=40),
        GenerationRequest(prompt=DOCS[2], mode="text_to_image", temperature=0),
        GenerationRequest(image=pics[1], mode="image_to_text", temperature=0, max_new_tokens=40),
    ]
    cont, image, caption = gen.generate(reqs)
    assert " ".join(words[:3]) + cont.text == DOCS[0]
    assert cont.token_ids[-1] == tok.vocab.eos_id
    off = tok.vocab.offset("image")
    assert [i - off for i in image.token_ids[1:-1]] == codes[0]
    assert caption.text == DOCS[3]
    out = write_samples([cont, image, caption], tmp_path / "out")
    page = (out / "index.html").read_text()
    assert "sample_001_image_0.png" in page and "sample_002_input_image_0.png" in page
    assert Image.open(out / "sample_001_image_0.png").size == (8, 8)
    assert json.loads((out / "tokens.json").read_text())[0]["token_ids"] == cont.token_ids


def test_speech_modes_write_wavs(tmp_path):
    import math
    import wave

    from sparsefusion.data.audio import write_wav
    from sparsefusion.tokenizers.image_vq import ImageVQConfig, VQImageTokenizer
    from sparsefusion.tokenizers.multimodal import MultimodalTokenizer
    from sparsefusion.tokenizers.speech_units import SpeechUnitsConfig, train_speech_units
    from sparsefusion.tokenizers.text_bpe import BPETextTokenizer
    from sparsefusion.tokenizers.vocab import UnifiedVocab

    t = torch.arange(8000) / 16000
    clip = torch.cat([0.5 * torch.sin(2 * math.pi * f * t) for f in (220, 880)])
    speech, _ = train_speech_units(SpeechUnitsConfig(num_units=8, griffin_lim_iters=4), [clip])
    text = BPETextTokenizer.train(DOCS, 280)
    image = VQImageTokenizer(ImageVQConfig(image_size=8, downsample=4, codebook_size=16)).eval()
    vocab = UnifiedVocab({"text": text.vocab_size, "image": 16, "speech": 8})
    tok = MultimodalTokenizer(text, image, vocab, speech)
    model, _ = tiny_generator_model(tok, "mot", modalities=["text", "image", "speech"])
    gen = Generator(model, tok, max_speech_units=6)
    assert "text_to_speech" in gen.modes and "speech_to_text" in gen.modes
    write_wav(tmp_path / "in.wav", clip)
    reqs = [
        GenerationRequest(prompt="A tone", mode="text_to_speech", max_new_tokens=20, cfg_scale=2),
        GenerationRequest(audio=tmp_path / "in.wav", mode="speech_to_text", max_new_tokens=4),
    ]
    tts, stt = gen.generate(reqs)
    units = tts.token_ids[1:-1]
    assert tts.token_ids[0] == vocab.boa_id and tts.token_ids[-1] == vocab.eoa_id
    assert 2 <= len(units) <= 6 and all(vocab.offset("speech") <= u < vocab.size for u in units)
    assert [s.modality for s in tts.segments] == ["speech"] and tts.segments[0].audio.size > 0
    assert all(vocab.boa_id not in stt.token_ids for _ in [0])
    out = write_samples([tts, stt], tmp_path / "out")
    with wave.open(str(out / "sample_000_speech_0.wav")) as w:
        assert w.getframerate() == 16000 and w.getnframes() == tts.segments[0].audio.size
    assert "<audio controls" in (out / "index.html").read_text()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "nan"])
def test_damaged_aux_routers_are_a_one_line_error(tmp_path, damage):
    """generate raises CheckpointError naming the file; eval (load_aux_routers) says why."""
    from sparsefusion.checkpoint.store import CheckpointError
    from sparsefusion.generate.run import load_run
    from sparsefusion.runs.folder import aux_routers_path, load_aux_routers, load_model, run_config

    tok = tiny_tokenizer()
    model, aux = tiny_generator_model(tok, "moe_ec")
    run = _write_run(tmp_path, tok, model, aux)
    file = aux_routers_path(run)
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif damage == "garbage":
        file.write_bytes(b"\xff" * 64)
    else:
        state = {k: torch.full_like(v, float("nan")) for k, v in aux.state_dict().items()}
        save_file(state, str(file))
    with pytest.raises(CheckpointError) as e:
        load_run(run)
    assert str(file) in str(e.value) and "\n" not in str(e.value)
    loaded, why = load_aux_routers(run, load_model(run, run_config(run))[0])
    assert loaded is None and str(file) in why

"""Tiny random Hugging Face models (built here with transformers; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a picture of a red square next to a blue circle",
    "mixture of transformers keeps one tower per modality",
    "hello world, hello tokens, hello images",
] * 8


def make_tokenizer(folder: Path, vocab_size: int) -> int:
    """Train a byte-level BPE of at most ``vocab_size`` ids into ``folder/tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size(with_added_tokens=True)


def make_llama(folder: Path, *, vocab: int = 320, layers: int = 2, seed: int = 0, **kw) -> Path:
    """A Llama-3-style model: GQA, llama3 RoPE scaling, untied head, plus its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        **kw,
    )
    model = LlamaForCausalLM(cfg).float()
    _randomize_norms(model)
    model.save_pretrained(folder)
    make_tokenizer(folder, vocab - 8)
    return folder


def make_qwen2(folder: Path, *, vocab: int = 320, layers: int = 2, seed: int = 1) -> Path:
    """A Qwen2-style model: q/k/v bias, tied embeddings, GQA, plus its tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = Qwen2ForCausalLM(cfg).float()
    _randomize_norms(model)
    with torch.no_grad():  # random q/k/v biases (transformers initialises them to zero)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    make_tokenizer(folder, vocab - 8)
    return folder


def make_mistral(folder: Path, *, vocab: int = 320, layers: int = 2, seed: int = 2) -> Path:
    """A Mistral-style model (GQA, no bias, untied head; sliding window off)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=None,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    )
    model = MistralForCausalLM(cfg).float()
    _randomize_norms(model)
    model.save_pretrained(folder)
    make_tokenizer(folder, vocab - 8)
    return folder


def _randomize_norms(model) -> None:
    """Norm weights away from 1, so a mix-up of norms shows in the logits."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


def hf_logits(folder: Path, ids_BT):
    """Logits of the Hugging Face model in ``folder`` (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids_BT).logits

"""Tiny models of every architecture, with auxiliary routers where batch-routed sites exist."""

from __future__ import annotations

import torch

from sparsefusion.models.transformer import ModelConfig, Transformer
from sparsefusion.nn.aux_router import AuxRouters
from sparsefusion.tokenizers.vocab import UnifiedVocab

VOCAB = UnifiedVocab({"text": 40, "image": 20})
_MOD = {"enabled": True, "interval": 2, "first_layer": 0, "capacity": 0.5}

ARCHS: dict[str, dict] = {
    "dense": {"arch": "dense"},
    "mot": {"arch": "mot", "num_kv_heads": 2},
    "moma": {"arch": "moma", "moe": {"experts": {"text": 2, "image": 2}}},
    "moe_ec": {"arch": "moe", "moe": {"num_experts": 4}},
    "moe_tc": {"arch": "moe", "moe": {"router": "token_choice", "num_experts": 4, "top_k": 2}},
    "mod": {"arch": "dense", "num_layers": 3, "mod": _MOD},
    "moma_mod": {
        "arch": "moma",
        "num_layers": 3,
        "moe": {"experts": {"text": 2, "image": 2}},
        "mod": _MOD,
    },
    "hybrid": {"arch": "mot", "moe": {"experts": {"text": 4}}},
}


def tiny_model(arch: str, seed: int = 0, **extra) -> tuple[Transformer, AuxRouters | None]:
    """A randomly initialised fp32 model (dim 32, 2-3 layers) and its auxiliary routers."""
    from sparsefusion.config import from_dict

    spec = {
        "dim": 32,
        "num_layers": 2,
        "num_heads": 4,
        "vocab_size": 128,
        "max_seq_len": 256,
        "init_std": 0.3,
        **ARCHS[arch],
        **extra,
    }
    torch.manual_seed(seed)
    model = Transformer(from_dict(ModelConfig, spec, where="model"))
    model.init_weights()
    aux = None
    if model.router_sites():
        aux = AuxRouters(32, model.router_sites())
        aux.init_weights(std=0.5)
    return model.eval(), aux


DOCS = [
    "The red circle is above the blue square.",
    "A green triangle sits left of a yellow star.",
    "Two small purple dots drift over a black line.",
    "One orange ring rests under the white cloud.",
]


def tiny_tokenizer():
    """A real multimodal tokenizer: BPE on DOCS, an untrained VQ (8x8 images, 4 codes of 16)."""
    from sparsefusion.tokenizers.image_vq import ImageVQConfig, VQImageTokenizer
    from sparsefusion.tokenizers.multimodal import MultimodalTokenizer
    from sparsefusion.tokenizers.text_bpe import BPETextTokenizer

    torch.manual_seed(0)
    text = BPETextTokenizer.train(DOCS * 4, 300)
    image = VQImageTokenizer(ImageVQConfig(image_size=8, downsample=4, codebook_size=16)).eval()
    vocab = UnifiedVocab({"text": text.vocab_size, "image": 16})
    return MultimodalTokenizer(text, image, vocab)


def tiny_generator_model(tok, arch: str = "mot", seed: int = 0, **extra):
    """A tiny model sized to ``tok``'s vocabulary (and aux routers when it needs them)."""
    return tiny_model(arch, seed, vocab_size=tok.vocab.padded_size(), **extra)

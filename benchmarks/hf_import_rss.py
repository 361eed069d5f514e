"""Peak resident memory of importing a Hugging Face checkpoint (``interop.load.import_hf``).

Writes a random checkpoint shaped like Qwen2.5-0.5B (bf16 safetensors, tied embeddings; nothing
is downloaded) unless ``--folder`` names an existing one, then imports it in a fresh process and
prints that process's peak RSS against the size of the weights (file, and as fp32 parameters).

    PYTHONPATH=src python benchmarks/hf_import_rss.py [--folder DIR] [--layers 24]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "num_hidden_layers": 24,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def write_checkpoint(folder: Path, layers: int) -> None:
    """A random bf16 checkpoint with Qwen2.5-0.5B's shapes (tensors written one by one)."""
    import torch
    from safetensors.torch import save_file

    cfg = dict(QWEN25_05B, num_hidden_layers=layers)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    K = D // cfg["num_attention_heads"]
    KV = cfg["num_key_value_heads"] * K
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (D, D),
            p + "self_attn.q_proj.bias": (D,),
            p + "self_attn.k_proj.weight": (KV, D),
            p + "self_attn.k_proj.bias": (KV,),
            p + "self_attn.v_proj.weight": (KV, D),
            p + "self_attn.v_proj.bias": (KV,),
            p + "self_attn.o_proj.weight": (D, D),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
        }
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _status_kb(key: str) -> int:
    """A line of /proc/self/status in KiB (VmRSS: now, VmHWM: peak), or ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(folder: str) -> None:
    """Import in this process and print JSON (peak RSS read by the parent)."""
    import time

    import torch

    from sparsefusion.interop.load import import_hf

    base_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    model = import_hf(folder)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    out = {"params": params, "param_bytes": params * 4, "seconds": seconds,
           "rss_before_import_kb": base_kb, "peak_kb": _status_kb("VmHWM")}  # fmt: skip
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", help="an existing HF folder (default: write a random one)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    tmp = None
    folder = Path(args.folder) if args.folder else None
    if folder is None:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name) / "qwen25-05b-random"
        write_checkpoint(folder, args.layers)
    run = subprocess.run([sys.executable, __file__, "--child", str(folder)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    peak_kb = stats["peak_kb"]
    file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    gib = 2**30
    print(f"checkpoint: {folder} ({file_bytes / gib:.2f} GiB of safetensors)")
    print(f"parameters: {stats['params'] / 1e6:.1f}M = {stats['param_bytes'] / gib:.2f} GiB fp32")
    base_kb = stats["rss_before_import_kb"]
    print(f"RSS before the import (python, torch, sparsefusion): {base_kb / 2**20:.2f} GiB")
    print(f"peak RSS of the importing process: {peak_kb / 2**20:.2f} GiB")
    grown = (peak_kb - base_kb) * 1024
    print(f"peak growth: {grown / gib:.2f} GiB = {grown / stats['param_bytes']:.2f}x fp32 params")
    print(f"import time: {stats['seconds']:.1f} s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

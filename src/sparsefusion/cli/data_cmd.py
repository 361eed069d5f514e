"""``sparsefusion data preview|tokenize`` and ``sparsefusion tokenizer train|inspect``.

``SOURCE_OR_PATH`` is a registered source name (``scenes``, ``openmoji``, ``mixture`` ...) or a
path (a JSONL file or a folder of ``.tar`` shards); further ``key=value`` overrides apply on top of
the preset (default ``mot``), e.g. ``data.mixture={kjv: 1, openmoji: 1}`` or
``tokenizer.image.train_steps=200``.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from sparsefusion.config import ConfigError

CELL = 96  # pixels per image in the preview grid
TEXT_H = 40


def _config(target: str, preset: str, overrides: list[str]):
    from sparsefusion.data.sources import SOURCES
    from sparsefusion.runs.presets import resolve_config

    if target in SOURCES:
        extra = [f"data.source={target}"]
    elif Path(target).exists():
        extra = [f"data.path={Path(target).resolve()}"]
    else:
        raise ConfigError(f"{target!r} is neither a data source {sorted(SOURCES)} nor a path")
    return resolve_config(preset, [*extra, *overrides])


def _tokenizer(cfg, source, tokenizer_dir: str | None):
    """The tokenizer (from ``--tokenizer`` or the cache), bound to the config's model."""
    from sparsefusion.tokenizers.build import load_or_train_tokenizer, load_tokenizer
    from sparsefusion.tokenizers.multimodal import TokenizerCacheError

    if tokenizer_dir:
        try:
            tokenizer = load_tokenizer(tokenizer_dir)
        except TokenizerCacheError as e:
            raise ConfigError(
                f"--tokenizer {tokenizer_dir}: not a tokenizer directory (one written by "
                f"'sparsefusion tokenizer train'): {e}"
            ) from e
    else:
        tokenizer = load_or_train_tokenizer(cfg.tokenizer, source, progress=False)
    tokenizer.bind_model(cfg.model)
    return tokenizer


def scan(source: Any, tokenizer: Any, num_docs: int) -> dict[str, Any]:
    """Read documents ``0..num_docs-1`` (fewer for a smaller source) and count what they hold.

    Returns:
        ``documents``, ``skipped`` (reason -> count), ``segments`` and ``tokens`` per modality
        (tokens include each modality's sentinels in ``text``), and ``docs`` (the documents read).
    """
    from sparsefusion.data.encoded import as_encoded
    from sparsefusion.data.issues import BadInput, DataIssues
    from sparsefusion.data.text import read_document

    issues, docs = DataIssues(), []
    names = tokenizer.modalities if tokenizer is not None else None
    size = len(source) if hasattr(source, "__len__") else num_docs
    for i in range(min(num_docs, size)):
        try:
            docs.append(read_document(source, i, names))
        except BadInput as e:
            issues.record(e)
    segments = Counter(s.modality for d in docs for s in d.segments)
    tokens: Counter[str] = Counter()
    if tokenizer is not None and docs:
        for encoded in tokenizer.encode_documents(docs):
            tokens.update(names[m] for m in as_encoded(encoded).modalities)
    return {
        "documents": len(docs),
        "skipped": dict(issues.counts),
        "segments": dict(segments),
        "tokens": dict(tokens),
        "docs": docs,
    }


def preview_grid(docs: list[Any], tokenizer: Any, num: int) -> Image.Image | None:
    """Rows of (original | image-tokenizer reconstruction, caption) for the first ``num`` images."""
    pairs: list[tuple[Image.Image, str]] = []
    for doc in docs:
        for j, seg in enumerate(doc.segments):
            if seg.modality == "image" and len(pairs) < num:
                pairs.append((seg.payload, _caption_of(doc, j)))
    if not pairs:
        return None
    recon = tokenizer.image.decode(tokenizer.image.encode([p for p, _ in pairs]))
    cols = 4
    rows = -(-len(pairs) // cols)
    grid = Image.new("RGB", (cols * 2 * CELL, rows * (CELL + TEXT_H)), "white")
    draw = ImageDraw.Draw(grid)
    for k, ((image, caption), rec) in enumerate(zip(pairs, recon, strict=True)):
        x, y = (k % cols) * 2 * CELL, (k // cols) * (CELL + TEXT_H)
        grid.paste(image.resize((CELL, CELL), Image.NEAREST), (x, y))
        grid.paste(rec.resize((CELL, CELL), Image.NEAREST), (x + CELL, y))
        lines = textwrap.wrap(caption.encode("ascii", "replace").decode(), 30)[:3]
        draw.multiline_text((x + 2, y + CELL + 1), "\n".join(lines), fill="black", spacing=1)
    return grid


def _caption_of(doc: Any, j: int) -> str:
    """The text next to image segment ``j``: the one after it for image-first documents, else
    the one before it (falling back to the other side)."""
    segs = doc.segments
    before = segs[j - 1].payload if j > 0 and segs[j - 1].modality == "text" else ""
    after = segs[j + 1].payload if j + 1 < len(segs) and segs[j + 1].modality == "text" else ""
    if doc.meta.get("kind") == "image_caption":
        return after or before
    return before or after


def cmd_preview(args: argparse.Namespace) -> int:
    from sparsefusion.data.audio import write_wav
    from sparsefusion.data.sources import build_source

    _check_counts(("--docs", args.docs, 1), ("--num", args.num, 0),
                  ("--num-audio", args.num_audio, 0))  # fmt: skip
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; name a folder to write to")
    cfg = _config(args.target, args.preset, args.overrides)
    source = build_source(cfg.data, seed=cfg.seed, split="train")
    tokenizer = _tokenizer(cfg, source, args.tokenizer)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder ({e.strerror})") from e
    stats = scan(source, tokenizer, args.docs)
    grid = preview_grid(stats["docs"], tokenizer, args.num)
    if grid is not None:
        grid.save(out / "grid.png")
    clips = [s.payload for d in stats["docs"] for s in d.segments if s.modality == "speech"]
    for k, clip in enumerate(clips[: args.num_audio]):
        write_wav(out / f"speech_{k}.wav", clip)
        if tokenizer.speech is not None:
            units = tokenizer.speech.encode([clip])[0]
            write_wav(out / f"speech_{k}_units.wav", tokenizer.speech.decode(units))
    summary = {k: v for k, v in stats.items() if k != "docs"}
    summary["source"] = source.name
    print(json.dumps(summary, indent=2))
    print(f"preview written to {out}" + (" (grid.png)" if grid is not None else ""))
    return 0


def _check_counts(*flags: tuple[str, int, int]) -> None:
    """Refuse a count below its minimum, naming the flag (before any work)."""
    for flag, value, low in flags:
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Encode a source into token shards (``data/tokenize.py``); several workers may share --out."""
    import os

    from sparsefusion.data.sources import build_source
    from sparsefusion.data.tokenize import tokenize_to_dir

    _check_counts(("--docs", args.docs, 0), ("--val-docs", args.val_docs, 0),
                  ("--docs-per-shard", args.docs_per_shard, 1))  # fmt: skip
    cfg = _config(args.target, args.preset, args.overrides)
    sources = {s: build_source(cfg.data, seed=cfg.seed, split=s) for s in ("train", "val")}
    tokenizer = _tokenizer(cfg, build_source(cfg.data, seed=0, split="train"), args.tokenizer)
    wanted = {"train": args.docs, "val": args.val_docs}
    num_docs = {}
    for split, src in sources.items():
        if hasattr(src, "__len__"):
            num_docs[split] = min(len(src), wanted[split]) if wanted[split] else len(src)
        elif wanted[split] or split == "val":
            num_docs[split] = wanted[split] or 256
        else:
            raise ConfigError(f"{src.name} is unlimited: give --docs N (documents to encode)")
    worker = int(os.environ.get("RANK", 0)) if args.worker is None else args.worker
    workers = int(os.environ.get("WORLD_SIZE", 1)) if args.num_workers is None else args.num_workers
    manifest = tokenize_to_dir(
        sources, tokenizer, args.out, num_docs=num_docs, docs_per_shard=args.docs_per_shard,
        worker=worker, num_workers=workers, strict=cfg.data.strict, progress=not args.quiet,
    )  # fmt: skip
    if manifest is None:
        print(f"worker {worker}/{workers}: shards written; other workers' shards still missing")
        return 0
    summary = {s: {k: v for k, v in info.items() if k != "shards"}
               for s, info in manifest["splits"].items()}  # fmt: skip
    print(json.dumps({"tokenizer_hash": manifest["tokenizer_hash"], **summary}, indent=2))
    print(f"token shards written to {args.out}; train on them with data.path={args.out}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from sparsefusion.data.sources import build_source
    from sparsefusion.tokenizers.build import train_tokenizer

    cfg = _config(args.target, args.preset, args.overrides)
    source = build_source(cfg.data, seed=cfg.seed, split="train")
    tok = train_tokenizer(cfg.tokenizer, source, progress=False)
    tok.save(args.out)
    print(f"tokenizer saved to {args.out}; use it with tokenizer.path={args.out}")
    return 0


def cmd_tokenizer_inspect(args: argparse.Namespace) -> int:
    from sparsefusion.tokenizers.build import load_tokenizer

    tok = load_tokenizer(args.dir)  # verifies the manifest hashes
    vocab = tok.vocab
    print(f"{args.dir}: verified; vocabulary {vocab.size} ids (padded {vocab.padded_size()})")
    for name in vocab.modalities:
        lo = vocab.offset(name)
        print(f"  {name:7s} ids [{lo}, {lo + vocab.modality_sizes[name]})")
    print(f"  image: {tok.describe_image()}")
    if tok.speech is not None:
        print(f"  speech: {tok.speech.cfg.units_per_second} units per second")
    if args.text:
        ids = tok.text.encode(args.text)
        print(f"  text {args.text!r} -> {len(ids)} ids {ids[:32]}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``data`` and ``tokenizer`` on the main parser's subcommands."""
    data = sub.add_parser("data", help="look at a data source").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("preview", help="grid.png of samples and reconstructions, WAVs, stats")
    _target_args(p)
    p.add_argument("--out", default="preview", help="output folder (default: preview)")
    p.add_argument("--num", type=int, default=16, help="images in the grid")
    p.add_argument("--num-audio", type=int, default=4, help="speech clips written as WAV")
    p.add_argument("--docs", type=int, default=200, help="documents scanned for statistics")
    p.add_argument("--tokenizer", help="a tokenizer directory (default: train or use the cache)")
    p.set_defaults(fn=cmd_preview)
    _add_tokenize_parser(data)
    tok = sub.add_parser("tokenizer", help="train or inspect tokenizers").add_subparsers(
        dest="tokenizer_command", required=True
    )
    p = tok.add_parser("train", help="train text, image (and speech) tokenizers on a source")
    _target_args(p)
    p.add_argument("--out", required=True, help="directory to write the tokenizer to")
    p.set_defaults(fn=cmd_tokenizer_train)
    p = tok.add_parser("inspect", help="verify and describe a tokenizer directory")
    p.add_argument("dir")
    p.add_argument("--text", help="also show how this text is tokenized")
    p.set_defaults(fn=cmd_tokenizer_inspect)


def _add_tokenize_parser(data: argparse._SubParsersAction) -> None:
    p = data.add_parser(
        "tokenize", help="encode a source once into memory-mapped token shards (data.path=DIR)"
    )
    _target_args(p)
    p.add_argument("--out", required=True, help="output folder (resumed when it exists)")
    p.add_argument("--docs", type=int, default=0, help="train documents (all of a finite source)")
    p.add_argument("--val-docs", type=int, default=0, help="val documents (default: all, or 256)")
    p.add_argument("--docs-per-shard", type=int, default=1024, help="documents per shard file")
    p.add_argument("--worker", type=int, help="this worker's index (default: $RANK or 0)")
    p.add_argument("--num-workers", type=int, help="workers sharing --out ($WORLD_SIZE or 1)")
    p.add_argument("--tokenizer", help="a tokenizer directory (default: train or use the cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_tokenize)


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="SOURCE_OR_PATH")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--preset", default="mot", help="preset the overrides apply to (default mot)")

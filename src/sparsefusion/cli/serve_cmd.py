"""``sparsefusion serve RUN_DIR [RUN_DIR ...]``: the local web playground and run viewer.

Binds 127.0.0.1 unless ``--host`` says otherwise; needs the ``serve`` extra
(``pip install 'sparsefusion[serve]'``).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from sparsefusion.cli.generate_cmd import add_step_arguments

log = logging.getLogger(__name__)


def add_command(sub) -> None:
    """Register ``serve`` on the ``sparsefusion`` sub-command parser."""
    from sparsefusion.serve.params import Limits  # plain values: no server dependency

    p = sub.add_parser(
        "serve",
        help="web playground and run viewer for run folders",
        usage="sparsefusion serve RUN_DIR [RUN_DIR ...] [--host 127.0.0.1] [--port 8000]",
    )
    p.add_argument("run_dirs", nargs="+", help="run folders to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda[:N]")
    add_step_arguments(p)
    p.add_argument("--queue-size", type=int, default=4,
                   help="requests per model that may wait besides a running batch")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=Limits.max_batch,
                   help="requests one model decodes together (1: one at a time)")  # fmt: skip
    p.add_argument("--max-upload-mb", type=float, default=4.0, help="largest image upload")
    p.add_argument("--max-prompt-chars", type=int, default=2000)
    p.add_argument("--max-new-tokens", type=int, default=2048, help="largest max_new_tokens")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=Limits.max_image_pixels,
        help="largest uploaded image, width x height (read before decoding)",
    )
    p.add_argument(
        "--max-body-kb",
        type=float,
        default=Limits.max_body_bytes / 1024,
        help="largest JSON body, checked before parsing",
    )
    p.add_argument("--max-json-depth", type=int, default=Limits.max_json_depth)
    p.add_argument("--max-samples", type=int, default=Limits.max_samples,
                   help="most samples per request")  # fmt: skip
    p.set_defaults(fn=cmd_serve)


def limits_from_args(args: argparse.Namespace):
    """The server limits from the command-line options (ValueError naming a bad option)."""
    from sparsefusion.serve.params import Limits

    names = ("queue_size", "max_prompt_chars", "max_new_tokens", "port", "max_image_pixels",
             "max_json_depth", "max_samples", "max_batch")  # fmt: skip
    for name in names:
        low = 0 if name == "queue_size" else 1
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}")
    for name in ("max_upload_mb", "max_body_kb"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    return Limits(
        max_prompt_chars=args.max_prompt_chars,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_new_tokens=args.max_new_tokens,
        queue_size=args.queue_size,
        max_batch=args.max_batch,
        max_image_pixels=args.max_image_pixels,
        max_body_bytes=int(args.max_body_kb * 1024),
        max_json_depth=args.max_json_depth,
        max_samples=args.max_samples,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from sparsefusion.serve import require_server

    try:
        require_server()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from sparsefusion.serve.app import create_app
    from sparsefusion.serve.engine import GeneratorBackend
    from sparsefusion.serve.runs import RunCatalog

    limits = limits_from_args(args)
    catalog = RunCatalog(args.run_dirs)
    loopback = _loopback(args.host)
    hosts = ["127.0.0.1", "localhost", args.host] if loopback else None
    app = create_app(
        catalog,
        GeneratorBackend(args.device, "compiled" if args.compile else args.step),
        limits,
        allowed_hosts=hosts,
    )
    if not loopback:
        log.warning("serving on %s: anyone who can reach this address can use it", args.host)
    for run in catalog:
        log.info("run %s: %s", run.name, run.path)
    print(f"open http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""Load test of ``sparsefusion serve``: concurrent text -> image clients, batched vs one at a time.

Serves one run on 127.0.0.1 (uvicorn in this process, a free port) twice: with requests batched
(``--max-batch`` N) and one at a time (max_batch 1). For ``--seconds`` each, ``--clients`` threads
post text -> image requests back to back (each its own seed); the report gives requests/s and the
p50/p95 latency of each server, and their ratio. Without a run folder it trains the demo MoT
for a few steps first (the timing needs the model's size, not its quality).

    python benchmarks/serve_load.py [--run RUN_DIR] [--clients 32] [--seconds 30] \
        [--max-batch 32] [--step static] [--out docs/benchmarks/serve_load.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from sparsefusion.serve.app import create_app
from sparsefusion.serve.engine import GeneratorBackend
from sparsefusion.serve.params import Limits
from sparsefusion.serve.runs import RunCatalog


def _demo_run(root: Path) -> Path:
    from sparsefusion.runs.presets import resolve_config
    from sparsefusion.train.trainer import train

    cfg = resolve_config("mot", [f"run.dir={root / 'mot'}", "train.steps=4", "run.eval_every=0",
                                 "run.tensorboard=false", "run.progress=log"])  # fmt: skip
    train(cfg)
    return root / "mot"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(run: Path, max_batch: int, clients: int, seconds: float, step: str) -> dict:
    limits = Limits(max_batch=max_batch, queue_size=clients)
    app = create_app(RunCatalog([run]), GeneratorBackend("cpu", step), limits)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/generate"
    body = {"run": run.name, "mode": "text_to_image", "prompt": "A red circle above a blue square."}
    with httpx.Client(timeout=600) as c:  # load the model (and compile) before timing
        assert c.post(url, json=body).status_code == 200
    latencies: list[float] = []
    errors: list[int] = []
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as c:
            n = 0
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = c.post(url, json={**body, "seed": 1000 * k + n})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(r.status_code)
                n += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server.should_exit = True
    lat = sorted(latencies)
    return {
        "max_batch": max_batch,
        "requests": len(lat),
        "errors": len(errors),
        "requests_per_s": len(lat) / wall,
        "p50_s": statistics.median(lat) if lat else None,
        "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="", help="a run folder (default: train the demo MoT briefly)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--step", default="static", help="the decode step of the batched server")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else _demo_run(Path(tmp))
        batched = _load(run, args.max_batch, args.clients, args.seconds, args.step)
        alone = _load(run, 1, args.clients, args.seconds, "eager")
    ratio = batched["requests_per_s"] / alone["requests_per_s"]
    result = {
        "clients": args.clients,
        "seconds": args.seconds,
        "threads": args.threads,
        "batched": batched,
        "one_at_a_time": alone,
        "requests_per_s_ratio": ratio,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

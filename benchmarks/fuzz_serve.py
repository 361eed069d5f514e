"""A longer fuzz run of serve's input boundary: the property tests of
``tests/serve/test_serve_fuzz.py`` with more examples each.

    python benchmarks/fuzz_serve.py --examples 2000 [--out fuzz_serve.json]

Each property (arbitrary JSON bodies, raw/deep/huge bodies, uploaded bytes, damaged metrics
files) runs ``--examples`` seeded examples; the property is a 200 or a 4xx naming the field,
never a 500, a traceback or a hang. Prints the status counts per property and exits non-zero on
the first counterexample (hypothesis prints it, shrunk).

Result (2026-12-06, ``--examples 1500``, 2 shared CPU cores, 190 s): 6,000 requests, no failure;
JSON bodies 50x 200 / 411x 400 / 55x 404 / 49x 415 / 935x 422; raw, deep and huge bodies
238x 200 / 489x 400 / 52x 413 / 721x 422; uploads 533x 200 / 2x 413 / 928x 415 / 37x 422;
damaged metrics files 1500x 200 (each of the three routes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="examples per property")
    parser.add_argument("--out", default="", help="write the status counts as JSON here")
    args = parser.parse_args()
    if args.examples < 1:
        parser.error("--examples must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "statuses.json"
        env = {
            **os.environ,
            "SPARSEFUSION_FUZZ_EXAMPLES": str(args.examples),
            "SPARSEFUSION_FUZZ_REPORT": str(report),
        }
        cmd = [sys.executable, "-m", "pytest", "tests/serve/test_serve_fuzz.py", "-q"]
        cmd += ["-p", "no:cacheprovider", "-p", "no:logging", "--hypothesis-show-statistics"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        seconds = time.perf_counter() - t0
        counts = json.loads(report.read_text()) if report.is_file() else {}
    row = {
        "examples_per_property": args.examples,
        "passed": proc.returncode == 0,
        "seconds": round(seconds, 1),
        "requests": {k: sum(v.values()) for k, v in counts.items()},
        "statuses": counts,
    }
    print(json.dumps(row, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

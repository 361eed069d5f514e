"""A longer fuzz run of the input boundaries (issue 28): the property tests with more examples.

The properties live in the tests, so CI and this command check the same thing:

- ``tests/data/test_data_fuzz.py``: random JSONL lines (any Unicode, lone surrogates, control
  characters, raw undecodable bytes, any segment type and nesting) as a dataset (each line a
  usable document or a counted ``BadInput`` naming ``file:line``; the loader finishes) and as a
  prompts file (requests, or one ``ValueError`` naming the line);
- ``tests/data/test_data_token_shard_checks.py``: byte flips, truncations and JSON field changes
  of a token-shard folder (a clean read, or one ``ValueError`` naming the file and field).

Run from the repository root: ``python benchmarks/fuzz_inputs.py --examples 2000 [--seed 28]``.
It prints one JSON row: examples per property, seed, seconds and pytest's verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TESTS = [
    "tests/data/test_data_fuzz.py",
    "tests/data/test_data_token_shard_checks.py::test_any_mutation_is_a_named_error_or_a_clean_read",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=2000, help="examples per property")
    p.add_argument("--seed", type=int, default=28, help="hypothesis seed")
    args = p.parse_args()
    if args.examples < 1:
        p.error("--examples must be >= 1")
    env = dict(os.environ, SPARSEFUSION_FUZZ_EXAMPLES=str(args.examples),
               SPARSEFUSION_FUZZ_SEED=str(args.seed))  # fmt: skip
    start = time.time()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
           *TESTS]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()
    row = {
        "examples_per_property": args.examples,
        "properties": 3,
        "seed": args.seed,
        "seconds": round(time.time() - start, 1),
        "passed": done.returncode == 0,
        "pytest": tail[-1] if tail else "",
    }
    print(json.dumps(row))
    if done.returncode != 0:
        print("\n".join(tail[-60:]), file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())

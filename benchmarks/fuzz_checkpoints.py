"""A longer checkpoint fuzz run than the test suite's (``tests/train/test_fuzz_checkpoints.py``).

Trains a ``mot-debug`` run to step 6 (checkpoints step_4 and step_6), then for each example
mutates step_6 of a copy (``tests/train/checkpoint_fuzz.py``: truncation, byte flips, JSON keys
added / removed / renamed / retyped, tensors added / removed / renamed / reshaped / cast /
non-finite) and checks the property: ``pick_checkpoint`` + ``load_weights`` (eval, export,
generate, serve) and resuming the run use a valid checkpoint (step_4, or the mutated step_6
where it stayed valid); never an error, a traceback or a hang. Prints how many examples ended
which way.

    python benchmarks/fuzz_checkpoints.py --examples 200 --pick-examples 1000 --seed 1

A violation stops the run with hypothesis's minimal failing mutation.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "train"))

from checkpoint_fuzz import base_run, check_pick, check_resume, mutations  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="resume examples")
    parser.add_argument("--pick-examples", type=int, default=500, help="pick_checkpoint examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from sparsefusion.checkpoint.store import checkpoint_dir
    from sparsefusion.models.transformer import Transformer
    from sparsefusion.runs.folder import run_config

    root = Path(tempfile.mkdtemp(prefix="fuzz_checkpoints_"))
    cache = str(root / "tokenizer_cache")
    base = base_run(root / "base", cache)
    common = settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
    outcomes: dict[str, collections.Counter] = {
        "pick": collections.Counter(),
        "resume": collections.Counter(),
    }

    @seed(args.seed)
    @settings(common, max_examples=args.pick_examples)
    @given(mutation=mutations())
    def pick(mutation):
        import shutil

        work = root / "pick"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base, work)
        mutation.apply(checkpoint_dir(work) / "step_00000006")
        outcome = check_pick(work, Transformer(run_config(work).model))
        outcomes["pick"][f"{mutation.file} {mutation.kind}: {outcome.split(':')[0]}"] += 1

    @seed(args.seed)
    @settings(common, max_examples=args.examples)
    @given(mutation=mutations())
    def resume(mutation):
        outcome = check_resume(base, root / "resume", cache, mutation)
        outcomes["resume"][f"{mutation.file} {mutation.kind}: {outcome.split(':')[0]}"] += 1

    for name, fn in (("pick", pick), ("resume", resume)):
        t0 = time.perf_counter()
        fn()
        total = sum(outcomes[name].values())
        print(f"{name}: {total} examples, no violation ({time.perf_counter() - t0:.0f} s)")
        for key, n in sorted(outcomes[name].items()):
            print(f"  {n:5d}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""compare: a loss stored as a string or a boolean is a non-finite point, never a silent drop."""

from __future__ import annotations

import json

import pytest

from sparsefusion.compare.curves import load_run


@pytest.mark.parametrize("bad", ["NaN", True, "1.5", [1.0], {"v": 1}])
def test_non_numeric_loss_is_marked_non_finite(tmp_path, bad):
    rows = [{"step": s, "flops": 1e9 * s, "loss": 3.0 - 0.1 * s} for s in range(1, 6)]
    rows[3]["loss"] = bad
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    nf = load_run(path).nonfinite["train"]
    assert (nf.first_step, nf.rows, nf.keys, nf.last_finite_step) == (4, 1, ("loss",), 3)

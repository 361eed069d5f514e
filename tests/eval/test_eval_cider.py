"""CIDEr-D against values of the reference implementation (pycocoevalcap 1.2's Cider scorer)."""

import pytest

from sparsefusion.eval.cider import cider_d, words

REFS = [
    ["a red circle above a blue square", "a blue square below a red circle"],
    ["a small green triangle on the left", "a green triangle at the left side"],
    ["two yellow crosses on a black background", "yellow crosses on black"],
]


def test_cider_matches_reference_implementation():
    cands = ["a red circle above a blue square", "a green triangle on the right", "purple diamond"]
    score, per = cider_d(cands, REFS)
    # pycocoevalcap 1.2 Cider().compute_score on the same captions
    assert per == pytest.approx([7.333333333333333, 3.889354147189766, 0.0], abs=1e-9)
    assert score == pytest.approx(3.740895826841033, abs=1e-9)


def test_cider_first_references_as_candidates():
    score, per = cider_d([r[0] for r in REFS], REFS)
    assert per == pytest.approx([7.333333333333333, 6.317351547806538, 6.730848250013305])
    assert score == pytest.approx(6.793844377051059)


def test_identical_highest_unrelated_zero():
    refs = [["a red circle in the middle"], ["a blue square on the left"], ["green cross"]]
    same, _ = cider_d(
        ["a red circle in the middle", "a blue square on the left", "green cross"], refs
    )
    partial, _ = cider_d(["a red circle", "a blue square", "green cross"], refs)
    unrelated, per = cider_d(["purple diamonds everywhere", "xyz", "orange stars"], refs)
    assert same > partial > unrelated
    assert unrelated == 0.0 and per == [0.0, 0.0, 0.0]


def test_tokenization_drops_punctuation_and_case():
    assert words("A Red, circle.") == ["a", "red", "circle"]
    assert (
        cider_d(["A red circle."], [["a red circle"]])[0]
        == cider_d(["a red circle"], [["a red circle"]])[0]
    )


def test_bad_input():
    with pytest.raises(ValueError, match="reference sets"):
        cider_d(["a"], [])
    with pytest.raises(ValueError, match="at least one reference"):
        cider_d(["a"], [[]])

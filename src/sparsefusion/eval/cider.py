"""CIDEr-D caption score (Vedantam et al., arXiv:1411.5726), without Java.

The maintained implementation (pycocoevalcap) ships Stanford CoreNLP and SPICE jars (about 100 MB)
and tokenizes through Java, so this module implements the same score and is tested against values
pycocoevalcap 1.2's ``Cider`` scorer gives on fixed examples (tests/eval/test_eval_cider.py):

- captions are lower-cased and split into ``[a-z0-9']+`` words (punctuation dropped, as the PTB
  tokenizer does for COCO);
- n-grams of order 1..4; each is weighted by tf-idf, with document frequencies counted over the
  reference sets of the whole evaluated corpus (``idf = log(num_images) - log(max(1, df))``);
- per order, the similarity of candidate and reference is the cosine of their tf-idf vectors with
  the candidate's weights clipped to the reference's (the "-D" variant), times a Gaussian penalty
  ``exp(-(l_c - l_r)^2 / (2 * 6^2))`` on the difference of their lengths (counted, as in the
  reference code, as the number of bigrams);
- the score of an image is 10 x the mean over orders and over its references; the corpus score is
  the mean over images.

Identical captions score highest; captions with no n-gram in common with their references score 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from sparsefusion.eval.pairs import words

NGRAM = 4
SIGMA = 6.0

Ngrams = Counter[tuple[str, ...]]


def ngram_counts(text: str, n: int = NGRAM) -> Ngrams:
    """Counts of every n-gram of order 1..n of a caption."""
    toks = words(text)
    counts: Ngrams = Counter()
    for k in range(1, n + 1):
        for i in range(len(toks) - k + 1):
            counts[tuple(toks[i : i + k])] += 1
    return counts


def _vector(counts: Ngrams, df: Counter, log_num: float) -> tuple[list[dict], list[float], int]:
    vec: list[dict] = [{} for _ in range(NGRAM)]
    norm = [0.0] * NGRAM
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        w = tf * (log_num - math.log(max(1.0, df[gram])))
        vec[n][gram] = w
        norm[n] += w * w
        if n == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _similarity(hyp, ref) -> list[float]:
    (v_h, n_h, l_h), (v_r, n_r, l_r) = hyp, ref
    penalty = math.exp(-((l_h - l_r) ** 2) / (2 * SIGMA**2))
    out = []
    for n in range(NGRAM):
        dot = sum(min(w, v_r[n].get(g, 0.0)) * v_r[n].get(g, 0.0) for g, w in v_h[n].items())
        cos = dot / (n_h[n] * n_r[n]) if n_h[n] > 0 and n_r[n] > 0 else 0.0
        out.append(cos * penalty)
    return out


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list]:
    """CIDEr-D of candidate captions against their reference captions.

    Args:
        candidates: one generated caption per image (I).
        references: the reference captions of each image (I lists, each non-empty).

    Returns:
        ``(corpus score, per-image scores)``.

    Raises:
        ValueError: on mismatched lengths or an image without references.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if any(len(r) == 0 for r in references):
        raise ValueError("every image needs at least one reference caption")
    if not candidates:
        return 0.0, []
    refs = [[ngram_counts(r) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for g in r})
    log_num = math.log(float(len(candidates)))
    scores = []
    for cand, rs in zip(candidates, refs, strict=True):
        hyp = _vector(ngram_counts(cand), df, log_num)
        total = 0.0
        for r in rs:
            total += sum(_similarity(hyp, _vector(r, df, log_num))) / NGRAM
        scores.append(10.0 * total / len(rs))
    return sum(scores) / len(scores), scores

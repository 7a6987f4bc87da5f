"""ROUGE-L as the MiniLLM/DSKD protocol computes it: `rouge_score` with stemming, F-measure, max over references,
x100."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from rouge_score import rouge_scorer


@functools.lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure x100 of one prediction against its best-matching reference (docs/methods.md)."""
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _scorer()
    # rouge_score's argument order is (target, prediction).
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of `rouge_l` (one test set, one seed)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    if not predictions:
        raise ValueError("mean_rouge_l of an empty set is undefined")
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(predictions)

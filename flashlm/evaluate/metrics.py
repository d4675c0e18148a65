"""Scoring functions shared by the evaluation tasks.

* SQuAD v1.1 exact match and F1 with the official answer normalisation (max over the gold answers).
* Exact match of token sequences (passkey, MQAR, cloze).
* BLEU and chrF through `sacrebleu` on detokenised text.
* Bits per byte and perplexity from summed negative log-likelihoods (nats).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ---- SQuAD v1.1 ---------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower-case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return max(float(pred == normalize_answer(g)) for g in _as_list(golds))


def f1_score(prediction: str, golds: str | Sequence[str]) -> float:
    """Token-overlap F1 of the normalised texts, the best over the gold answers (v1.1: no overlap → 0)."""
    return max(_token_f1(prediction, g) for g in _as_list(golds))


def squad_scores(predictions: Sequence[str], golds: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 in percent, as the official v1.1 script reports them."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0, "count": 0}
    em = sum(exact_match(p, g) for p, g in zip(predictions, golds, strict=True))
    f1 = sum(f1_score(p, g) for p, g in zip(predictions, golds, strict=True))
    n = len(predictions)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "count": n}


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _as_list(golds: str | Sequence[str]) -> list[str]:
    items = [golds] if isinstance(golds, str) else list(golds)
    if not items:
        raise ValueError("no gold answers given")
    return items


# ---- exact match of sequences -------------------------------------------------------------------
def sequence_match(prediction: Sequence[int], answer: Sequence[int]) -> bool:
    """True when the predicted ids equal the answer ids exactly (passkey, MQAR, cloze)."""
    return list(prediction) == list(answer)


def accuracy(predictions: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> float:
    """Fraction of items whose predicted ids match the answer exactly."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    hits = sum(sequence_match(p, a) for p, a in zip(predictions, answers, strict=True))
    return hits / len(answers)


# ---- translation --------------------------------------------------------------------------------
def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing), 0-100."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (character n-gram F-score, β = 2), 0-100."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")


# ---- language modelling -------------------------------------------------------------------------
def utf8_bytes(text: str) -> int:
    """Length of `text` in UTF-8 bytes."""
    return len(text.encode("utf-8"))


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood (nats) over a text divided by (ln 2 · its UTF-8 bytes)."""
    if n_bytes <= 0:
        raise ValueError("bits per byte needs at least one byte of text")
    return total_nats / (math.log(2) * n_bytes)


def perplexity(total_nats: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    mean = total_nats / n_tokens
    return math.exp(mean) if mean < 700 else math.inf


__all__ = [
    "accuracy",
    "bits_per_byte",
    "bleu",
    "chrf",
    "exact_match",
    "f1_score",
    "normalize_answer",
    "perplexity",
    "sequence_match",
    "squad_scores",
    "utf8_bytes",
]

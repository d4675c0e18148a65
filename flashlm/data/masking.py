"""Masked-LM corruption and next-sentence pairs: the raw material of the masked objectives.

Everything here works on numpy token arrays with an explicit `np.random.Generator`, so a batch is a
pure function of its seed (exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100


@dataclass(frozen=True)
class Masking:
    """How tokens are chosen and corrupted (BERT: 15%, 80/10/10; ModernBERT: 30%)."""

    rate: float = 0.15
    mask_prob: float = 0.8  # of the chosen tokens → <mask>
    random_prob: float = 0.1  # → a random ordinary token; the rest stay unchanged
    max_span: int = 1  # > 1: spans of 1..max_span consecutive tokens


def choose_positions(eligible: np.ndarray, rate: float, max_span: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean [B, T]: which eligible tokens to predict, `rate` of them on average (spans when max_span > 1)."""
    if max_span <= 1:
        return (rng.random(eligible.shape) < rate) & eligible
    chosen = np.zeros_like(eligible)
    for row in range(eligible.shape[0]):
        candidates = np.flatnonzero(eligible[row])
        budget = int(rng.binomial(len(candidates), rate)) if len(candidates) else 0
        taken = 0
        while taken < budget:
            start = candidates[rng.integers(len(candidates))]
            length = min(int(rng.integers(1, max_span + 1)), budget - taken)
            span = np.arange(start, min(start + length, eligible.shape[1]))
            span = span[eligible[row, span] & ~chosen[row, span]]
            chosen[row, span] = True
            taken += len(span)
            if len(span) == 0 and chosen[row, candidates].all():
                break
    return chosen


def corrupt(
    tokens: np.ndarray,
    chosen: np.ndarray,
    masking: Masking,
    mask_id: int,
    ordinary_ids: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Replace chosen tokens: `mask_prob` by <mask>, `random_prob` by random ordinary tokens, rest kept."""
    out = tokens.copy()
    draw = rng.random(tokens.shape)
    to_mask = chosen & (draw < masking.mask_prob)
    to_random = chosen & (draw >= masking.mask_prob) & (draw < masking.mask_prob + masking.random_prob)
    out[to_mask] = mask_id
    out[to_random] = rng.choice(ordinary_ids, size=int(to_random.sum()))
    return out


def masked_lm_example(
    window: np.ndarray,
    masking: Masking,
    mask_id: int,
    special_ids: set[int],
    vocab_size: int,
    rng: np.random.Generator,
    next_token: bool = True,
    rate: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets [B, T] from windows [B, T+1]; targets are IGNORE except at masked tokens.

    next_token=True is GPT-BERT's masked *next*-token prediction: a masked token at window position i
    is predicted at output position i-1, exactly where a causal LM predicts it, so one LM head serves
    both. next_token=False is classic BERT: the masked token is predicted in place.
    """
    specials = np.array(sorted(special_ids))
    eligible = ~np.isin(window, specials)
    if next_token:
        eligible[:, 0] = False  # nothing predicts the first token
    else:
        eligible[:, -1] = False  # the last token is not part of the inputs
    chosen = choose_positions(eligible, masking.rate if rate is None else rate, masking.max_span, rng)
    ordinary = np.setdiff1d(np.arange(vocab_size), specials)
    corrupted = corrupt(window, chosen, masking, mask_id, ordinary, rng)
    inputs = corrupted[:, :-1]
    if next_token:
        targets = np.where(chosen[:, 1:], window[:, 1:], IGNORE)
    else:
        targets = np.where(chosen[:, :-1], window[:, :-1], IGNORE)
    return inputs, targets


def masking_rate(step: int, total_steps: int, start: float, end: float | None) -> float:
    """A linear schedule from `start` to `end` over training (constant when end is None)."""
    if end is None or total_steps <= 1:
        return start
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * frac


def nsp_pair(
    tokens: np.ndarray,
    doc_offsets: np.ndarray,
    length: int,
    rng: np.random.Generator,
    bos_id: int,
    sep_id: int,
    eos_id: int,
    pad_id: int,
) -> tuple[np.ndarray, int, int]:
    """One `<bos> A <sep> B <eos>` sequence of exactly `length` tokens (right-padded), its label, its length.

    A span of a random document is split at a random token into A and the true continuation B.
    Label 1 keeps B; label 0 takes B from another document instead, a segment of the same length that
    ends as far from its document's end and starts after its document's start, so that nothing but the
    text tells the labels apart: where B ends (often at a document's end) and how long it is are the
    same in both. Segments never include a document's leading <bos> or trailing <eos>.
    """
    budget = length - 3
    n_docs = len(doc_offsets) - 1
    doc = int(rng.integers(n_docs))
    start, end = int(doc_offsets[doc]), int(doc_offsets[doc + 1]) - 1  # drop the <eos>
    start += int(start < end and tokens[start] == bos_id)  # and the document's own <bos> (shards frame both)
    span = min(end - start, budget)
    a_start = start + int(rng.integers(0, end - start - span + 1))
    split = int(rng.integers(1, span)) if span >= 2 else 1
    a = tokens[a_start : a_start + split]
    b_start, b_len = a_start + split, max(span - split, 1)
    after = max(end - (b_start + b_len), 0)  # tokens of the document after B
    host = _host_document(doc_offsets, doc, b_len + after, rng) if n_docs > 1 else None
    is_next = int(rng.random() < 0.5) if host is not None else 1
    if b_start >= end and host is not None:  # a one-token document: nothing follows it
        is_next = 0
    if not is_next:
        b_start = int(doc_offsets[host + 1]) - 1 - after - b_len
    b = tokens[b_start : b_start + b_len]
    seq = np.concatenate([[bos_id], a, [sep_id], b, [eos_id]]).astype(np.int64)
    out = np.full(length, pad_id, dtype=np.int64)
    out[: len(seq)] = seq
    return out, is_next, len(seq)


def _host_document(
    doc_offsets: np.ndarray, doc: int, need: int, rng: np.random.Generator, tries: int = 32
) -> int | None:
    """A random document other than `doc` with more than `need` tokens (before its <eos>), or None.

    Rejection sampling: uniform over the documents that qualify, and O(1) per pair on average
    whatever the size of the corpus.
    """
    n_docs = len(doc_offsets) - 1
    for _ in range(tries):
        other = (doc + 1 + int(rng.integers(n_docs - 1))) % n_docs
        if doc_offsets[other + 1] - doc_offsets[other] - 1 > need:
            return other
    return None

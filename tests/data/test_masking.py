"""Masking statistics and next-sentence pairs on large samples."""

import numpy as np
import pytest

from flashlm.data.masking import IGNORE, Masking, masked_lm_example, masking_rate, nsp_pair

SPECIALS = {0, 1, 2, 3, 4}
MASK, VOCAB = 3, 1000


def windows(rng, rows=400, length=129):
    w = rng.integers(5, VOCAB, size=(rows, length))
    w[:, 0] = 1  # <bos>
    w[:, 60] = 2  # an <eos> in the middle
    return w


@pytest.mark.parametrize("max_span", [1, 3])
@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_masking_rates_match_the_configuration(rate, max_span):
    rng = np.random.default_rng(0)
    w = windows(rng)
    inputs, targets = masked_lm_example(w, Masking(rate=rate, max_span=max_span), MASK, SPECIALS, VOCAB, rng)
    chosen = targets != IGNORE
    eligible = ~np.isin(w[:, 1:], list(SPECIALS))
    assert abs(chosen.sum() / eligible.sum() - rate) < 0.01
    # targets are the true next tokens; specials are never chosen
    assert np.array_equal(targets[chosen], w[:, 1:][chosen])
    assert not chosen[~eligible].any()
    # corruption of the chosen input tokens (input position i+1 holds the token predicted at i)
    corrupted_in = inputs[:, 1:][chosen[:, :-1]]
    original_in = w[:, 1:-1][chosen[:, :-1]]
    as_mask = (corrupted_in == MASK).mean()
    kept = (corrupted_in == original_in).mean()
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03
    # tokens that were not chosen are untouched, specials included
    untouched = ~np.pad(chosen, ((0, 0), (1, 0)))[:, :-1]
    assert np.array_equal(inputs[untouched], w[:, :-1][untouched])


def test_spans_are_contiguous_runs():
    rng = np.random.default_rng(1)
    w = windows(rng)
    _, targets = masked_lm_example(w, Masking(rate=0.3, max_span=3), MASK, SPECIALS, VOCAB, rng)
    chosen = targets != IGNORE
    runs = np.diff(np.pad(chosen.astype(int), ((0, 0), (1, 1))), axis=1)
    lengths = np.flatnonzero(runs == -1) - np.flatnonzero(runs == 1)
    assert lengths.mean() > 1.5  # single-token masking would give ~1.2 at this rate


def test_classic_bert_masking_predicts_in_place():
    rng = np.random.default_rng(2)
    w = windows(rng)
    inputs, targets = masked_lm_example(w, Masking(), MASK, SPECIALS, VOCAB, rng, next_token=False)
    chosen = targets != IGNORE
    assert np.array_equal(targets[chosen], w[:, :-1][chosen])
    assert (inputs[chosen] == MASK).mean() > 0.7


def test_linear_masking_schedule():
    assert masking_rate(0, 101, 0.3, 0.15) == 0.3
    assert masking_rate(100, 101, 0.3, 0.15) == pytest.approx(0.15)
    assert masking_rate(50, 101, 0.3, 0.15) == pytest.approx(0.225)
    assert masking_rate(7, 10, 0.2, None) == 0.2


def test_nsp_labels_are_balanced_and_positives_adjacent():
    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 200, size=300)
    offsets = np.concatenate([[0], np.cumsum(lengths + 1)])
    tokens = 5 + np.arange(offsets[-1])  # every stream position holds a distinct token
    tokens[offsets[1:] - 1] = 2  # <eos> closes every document
    doc_of = np.searchsorted(offsets, np.arange(offsets[-1]), side="right") - 1
    labels, shape = [], {0: [], 1: []}
    for _ in range(4000):
        seq, label, n = nsp_pair(tokens, offsets, 64, rng, bos_id=1, sep_id=4, eos_id=2, pad_id=0)
        assert len(seq) == 64 and seq[0] == 1 and seq[n - 1] == 2 and (seq[n:] == 0).all()
        sep = int(np.flatnonzero(seq == 4)[0])
        a, b = seq[1:sep] - 5, seq[sep + 1 : n - 1] - 5  # stream positions
        assert len(a) > 0 and len(b) > 0 and (np.diff(a) == 1).all() and (np.diff(b) == 1).all()
        assert len(set(doc_of[a])) == 1 and len(set(doc_of[b])) == 1  # segments stay inside a document
        if label == 1:
            assert b[0] == a[-1] + 1
        else:
            assert doc_of[b[0]] != doc_of[a[0]]
            assert b[0] > offsets[doc_of[b[0]]]  # a negative B never starts its document either
        shape[label].append((offsets[doc_of[b[-1]] + 1] - 2 - b[-1], len(b), n))  # tokens after B in its doc
        labels.append(label)
    assert abs(np.mean(labels) - 0.5) < 0.03
    # no shortcut: B ends as far from its document's end, and pairs are as long, whatever the label
    pos, neg = (np.array(shape[k]) for k in (1, 0))
    assert (pos[:, 0] == 0).mean() == pytest.approx((neg[:, 0] == 0).mean(), abs=0.04)
    assert pos[:, 1].mean() == pytest.approx(neg[:, 1].mean(), rel=0.05)
    assert pos[:, 2].mean() == pytest.approx(neg[:, 2].mean(), rel=0.05)

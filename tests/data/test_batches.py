"""Deterministic, resumable batch sampling (flashlm.data.batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashlm.config import get_preset
from flashlm.data.batches import (
    IGNORE_INDEX,
    BatchSlot,
    TokenStream,
    causal_batch,
    clm_batch,
    document_ids,
    eval_batches,
    eval_starts,
    read_windows,
)
from flashlm.errors import DataError
from flashlm.model.transformer import FlashLM

EOS = 2


def docs_stream(n_docs: int = 60, seed: int = 0) -> tuple[TokenStream, TokenStream]:
    """The same synthetic documents (each ending in <eos>) with bounds from offsets and from <eos>."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(5, 500, size=rng.integers(3, 40)), EOS) for _ in range(n_docs)]
    tokens = np.concatenate(docs).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return TokenStream(tokens, doc_starts=offsets), TokenStream(tokens, eos_id=EOS)


def test_batch_is_a_pure_function_of_the_step():
    stream, _ = docs_stream()
    a = clm_batch(stream, BatchSlot(seed=1, step=5, batch_size=4), seq_len=16)
    b = clm_batch(stream, BatchSlot(seed=1, step=5, batch_size=4), seq_len=16)
    c = clm_batch(stream, BatchSlot(seed=1, step=6, batch_size=4), seq_len=16)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.input_ids.dtype == torch.int64 and a.input_ids.shape == (4, 16) and a.doc_ids is None


def test_targets_are_the_inputs_shifted_by_one():
    stream, _ = docs_stream()
    batch = clm_batch(stream, BatchSlot(seed=0, step=1, batch_size=3), seq_len=20)
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])


@pytest.mark.parametrize(("world", "accum"), [(2, 1), (4, 1), (2, 3), (1, 4)])
def test_ranks_and_micro_steps_split_one_global_batch(world, accum):
    stream, _ = docs_stream()
    rows = 2
    whole = clm_batch(stream, BatchSlot(seed=3, step=9, batch_size=rows * world * accum), seq_len=8)
    parts = [
        clm_batch(stream, BatchSlot(3, 9, rows, rank, world, micro, accum), seq_len=8).input_ids
        for micro in range(accum)
        for rank in range(world)
    ]
    assert torch.equal(torch.cat(parts), whole.input_ids)


def test_document_ids_from_offsets_and_from_eos_agree():
    by_offsets, by_eos = docs_stream()
    starts = np.array([0, 7, 100, 333])
    windows = read_windows(by_offsets.tokens, starts, 65)
    a, b = document_ids(by_offsets, starts, windows), document_ids(by_eos, starts, windows)
    assert np.array_equal(a, b)
    assert (a[:, 0] == 0).all() and (np.diff(a, axis=1) >= 0).all() and a.max() > 0
    # a new document starts right after each <eos>
    after_eos = np.zeros_like(windows, dtype=bool)
    after_eos[:, 1:] = windows[:, :-1] == EOS
    assert np.array_equal(np.diff(a, axis=1) == 1, after_eos[:, 1:])


def test_packed_batch_ignores_targets_across_documents():
    stream, _ = docs_stream()
    batch = causal_batch(stream, np.array([0, 50, 200]), seq_len=48, packed=True)
    crossing = batch.doc_ids[:, 1:] != batch.doc_ids[:, :-1]  # input t+1 starts a new document
    assert crossing.any()
    assert (batch.targets[:, :-1][crossing] == IGNORE_INDEX).all()
    assert (batch.input_ids[:, :-1][crossing] == EOS).all()
    plain = causal_batch(stream, np.array([0, 50, 200]), seq_len=48)
    assert (plain.targets != IGNORE_INDEX).all()
    kept = batch.targets != IGNORE_INDEX
    assert torch.equal(batch.targets[kept], plain.targets[kept])


def test_packed_documents_do_not_see_each_other():
    torch.manual_seed(0)
    model = FlashLM(get_preset("nano")).eval()
    stream, _ = docs_stream()
    batch = causal_batch(stream, np.array([10]), seq_len=64, packed=True)
    docs = batch.doc_ids[0]
    second = (docs == 1).nonzero().flatten()
    assert len(second) > 1
    with torch.no_grad():
        packed = model(batch.input_ids, doc_ids=batch.doc_ids).logits[0, second]
        alone = model(batch.input_ids[:, second]).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_windows_read_from_a_memmap(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    stream = TokenStream(np.memmap(path, dtype=np.uint16, mode="r"))
    batch = clm_batch(stream, BatchSlot(seed=0, step=1, batch_size=4), seq_len=10)
    assert torch.equal(batch.targets, batch.input_ids + 1)


def test_too_short_streams_fail_clearly():
    with pytest.raises(DataError, match="fewer than one window"):
        clm_batch(TokenStream(np.arange(10)), BatchSlot(0, 1, 2), seq_len=16)
    with pytest.raises(DataError, match="validation"):
        eval_starts(10, 16, 4)


def test_eval_windows_cover_the_stream_once():
    n, seq = 1000, 32
    starts = eval_starts(n, seq, count=10_000)
    assert len(starts) == (n - 1) // seq
    targets = np.concatenate([np.arange(s + 1, s + seq + 1) for s in starts])
    assert len(np.unique(targets)) == len(targets)  # every token a target at most once
    assert targets.min() == 1 and targets.max() == len(starts) * seq
    few = eval_starts(n, seq, count=5)
    assert len(few) == 5 and np.all(np.diff(few) >= seq)


def test_eval_batches_split_over_ranks_with_equal_counts():
    stream = TokenStream(np.arange(1000) % 400)
    count, rows = 13, 2
    single = [b for b in eval_batches(stream, 16, rows * 2, count)]
    per_rank = [list(eval_batches(stream, 16, rows, count, rank, world=2)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single)
    for whole, r0, r1 in zip(single, *per_rank, strict=True):
        assert torch.equal(whole.targets, torch.cat([r0.targets, r1.targets]))
    valid = sum(int((b.targets != IGNORE_INDEX).any(dim=1).sum()) for b in single)
    assert valid == count

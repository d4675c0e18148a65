"""Batch makers: deterministic, resumable sampling of training batches.

A step's *global batch* holds ``world × batch_size × grad_accum`` rows. Its window starts are drawn
from a generator seeded with ``(seed, step, stream)`` only, and the rank ``r`` at micro-step ``m``
takes rows ``[(m·world + r)·B, (m·world + r + 1)·B)``. So

- batch k is a pure function of k: resuming needs only the step, never an iterator's state;
- the rows a step trains on do not depend on how they are split over ranks and micro-steps
  (2 ranks × B rows draw exactly the rows that 1 rank × 2B rows draws).

A batch maker returns a `Batch`; the masked objectives fill ``mode``, ``prefix_len`` and ``extras``:

- `mlm_batch`: windows masked by `flashlm.data.masking` (masked next-token prediction by default),
  bidirectional attention kept inside each document;
- `nsp_batch`: ``<bos> A <sep> B <eos>`` pairs, right-padded, also carrying MLM masks (as in BERT),
  with ``extras["nsp_labels"]``;
- `prefix_lm_batch`: windows split at a random point: prefix bidirectional, the rest causal, loss on
  the rest only.

Randomness beyond the window starts (masks, pair choice, split points) comes from one generator per
*global row*, seeded with ``(seed, step, stream, row)``, so it too is independent of the rank split.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from flashlm.data.masking import Masking, masked_lm_example, nsp_pair
from flashlm.errors import DataError

IGNORE_INDEX = -100  # targets with this value carry no loss


@dataclass
class Batch:
    """One micro-batch: model inputs, shifted targets and whatever an objective needs besides."""

    input_ids: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64; IGNORE_INDEX where there is no loss
    mode: str = "causal"  # attention mode: causal | bidirectional | prefix
    doc_ids: torch.Tensor | None = None  # [B, T] document index of each token (packed attention)
    prefix_len: torch.Tensor | None = None  # [B] (prefix mode)
    extras: dict[str, Any] = field(default_factory=dict)  # objective-specific tensors

    def to(self, device: torch.device | str) -> Batch:
        """The batch with every tensor (extras included) on `device`."""
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t
        return replace(
            self,
            input_ids=move(self.input_ids),
            targets=move(self.targets),
            doc_ids=move(self.doc_ids),
            prefix_len=move(self.prefix_len),
            extras={k: move(v) for k, v in self.extras.items()},
        )

    @property
    def num_tokens(self) -> int:
        """Input positions in the batch (B × T)."""
        return self.input_ids.numel()


@dataclass(frozen=True)
class SpecialTokens:
    """The special ids the masked objectives need, and the vocabulary random replacements come from."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    mask: int = 3
    sep: int = 4
    vocab_size: int = 0  # ids below this are drawn for random replacement (specials excluded)
    ids: frozenset[int] = frozenset({0, 1, 2, 3, 4})  # never masked

    @classmethod
    def from_tokenizer(cls, tok: Any) -> SpecialTokens:
        """The ids of a `flashlm.tokenizer.Tokenizer`; DataError when a masked-LM token is missing."""
        roles = {role: getattr(tok, f"{role}_id") for role in ("pad", "bos", "eos", "mask", "sep")}
        missing = [role for role, value in roles.items() if value is None]
        if missing:
            names = ", ".join(f"<{m}>" for m in missing)
            raise DataError(
                f"the tokenizer has no {names} token; masked LM and NSP need <pad> <bos> <eos> "
                "<mask> <sep> (train one with `flashlm tokenizer train`)"
            )
        return cls(**roles, vocab_size=tok.vocab_size, ids=frozenset(tok.special_ids))


@dataclass(frozen=True)
class TokenStream:
    """A split's tokens as one 1-D array (a memmap is never read whole) and its document bounds.

    Document boundaries come from `doc_starts` (sorted start offsets) when given, else from `eos_id`
    (a document ends with its <eos>); with neither, the stream is one document. `specials` is set
    when the tokenizer is known (the masked objectives need it).
    """

    tokens: np.ndarray
    doc_starts: np.ndarray | None = None
    eos_id: int | None = None
    specials: SpecialTokens | None = None

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class BatchSlot:
    """Where a micro-batch sits in the run: which rows of which step's global batch it holds."""

    seed: int
    step: int
    batch_size: int  # rows per rank per micro-step
    rank: int = 0
    world: int = 1
    micro: int = 0
    accum: int = 1

    @property
    def global_rows(self) -> int:
        return self.batch_size * self.world * self.accum

    @property
    def rows(self) -> slice:
        start = (self.micro * self.world + self.rank) * self.batch_size
        return slice(start, start + self.batch_size)


def stream_id(name: str) -> int:
    """A stable integer for an objective name, so objectives draw independent windows."""
    return zlib.crc32(name.encode())


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator for one step's global batch: a pure function of its arguments."""
    return np.random.default_rng([seed, step, stream])


def random_starts(n_tokens: int, span: int, slot: BatchSlot, stream: int = 0) -> np.ndarray:
    """Start offsets of this slot's windows of `span` tokens, drawn uniformly from the stream."""
    high = n_tokens - span + 1
    if high <= 0:
        raise DataError(
            f"the token stream has {n_tokens} tokens, fewer than one window of {span}; "
            "use more data or a shorter train.seq_len"
        )
    starts = step_rng(slot.seed, slot.step, stream).integers(0, high, size=slot.global_rows)
    return starts[slot.rows]


def read_windows(tokens: np.ndarray, starts: np.ndarray, span: int) -> np.ndarray:
    """Rows ``tokens[s : s + span]`` for each start, as int64 [len(starts), span]."""
    index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(span, dtype=np.int64)
    return np.asarray(tokens[index], dtype=np.int64)


def document_ids(stream: TokenStream, starts: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Document index of every window position, counted from 0 at each window's first token."""
    if stream.doc_starts is not None:
        positions = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(windows.shape[1])
        index = np.searchsorted(stream.doc_starts, positions, side="right")
        return index - index[:, :1]
    if stream.eos_id is not None:
        ends = (windows == stream.eos_id).astype(np.int64)
        return np.cumsum(ends, axis=1) - ends  # the <eos> belongs to the document it ends
    return np.zeros_like(windows)


def causal_batch(stream: TokenStream, starts: np.ndarray, seq_len: int, packed: bool = False) -> Batch:
    """Windows of seq_len + 1 tokens → inputs and next-token targets.

    With `packed`, `doc_ids` keeps attention inside documents and targets that belong to another
    document than their input (the token after an <eos>) are ignored.
    """
    windows = read_windows(stream.tokens, starts, seq_len + 1)
    inputs, targets = windows[:, :-1], windows[:, 1:].copy()
    doc_ids = None
    if packed:
        docs = document_ids(stream, starts, windows)
        targets[docs[:, 1:] != docs[:, :-1]] = IGNORE_INDEX
        doc_ids = torch.from_numpy(np.ascontiguousarray(docs[:, :-1]))
    return Batch(torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(targets), "causal", doc_ids)


def clm_batch(stream: TokenStream, slot: BatchSlot, seq_len: int, packed: bool = False) -> Batch:
    """The causal-LM micro-batch for `slot`: random windows, a pure function of (seed, step, rows)."""
    starts = random_starts(len(stream), seq_len + 1, slot, stream_id("clm"))
    return causal_batch(stream, starts, seq_len, packed)


def eval_starts(n_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """Fixed evaluation windows: all non-overlapping ones when `count` covers the stream, else
    `count` of them evenly spaced. Consecutive windows share one token, so every token but the
    first is a target exactly once when the whole stream is covered."""
    fit = (n_tokens - 1) // seq_len
    if fit <= 0:
        raise DataError(
            f"the validation stream has {n_tokens} tokens, fewer than one window of "
            f"{seq_len + 1}; use more validation data or a shorter train.seq_len"
        )
    chosen = np.arange(fit) if count >= fit else np.arange(count) * fit // count
    return chosen.astype(np.int64) * seq_len


def eval_batches(
    stream: TokenStream, seq_len: int, batch_size: int, count: int, rank: int = 0, world: int = 1, packed: bool = False
) -> Iterator[Batch]:
    """This rank's share of the fixed evaluation windows, in batches of `batch_size` rows.

    Every rank yields the same number of batches (FSDP needs matching forwards); rows past the
    last window repeat window 0 with every target ignored.
    """
    starts = eval_starts(len(stream), seq_len, count)
    per_step = batch_size * world
    for first in range(0, len(starts), per_step):
        rows = np.arange(first + rank * batch_size, first + (rank + 1) * batch_size)
        valid = rows < len(starts)
        batch = causal_batch(stream, starts[np.where(valid, rows, 0)], seq_len, packed)
        batch.targets[torch.from_numpy(~valid)] = IGNORE_INDEX
        yield batch


# ---- masked objectives -----------------------------------------------------------------------------
def row_rngs(slot: BatchSlot, stream: int) -> list[np.random.Generator]:
    """One generator per row of this slot, seeded by the row's index in the step's global batch."""
    first = slot.rows.start
    return [np.random.default_rng([slot.seed, slot.step, stream, first + i]) for i in range(slot.batch_size)]


def need_specials(stream: TokenStream) -> SpecialTokens:
    if stream.specials is None:
        raise DataError(
            "masked objectives need the tokenizer's special ids; give the run a tokenizer "
            "(train.tokenizer, or a tokenizer.json in the shard directory)"
        )
    return stream.specials


def mask_rows(
    windows: np.ndarray,
    rngs: list[np.random.Generator],
    masking: Masking,
    specials: SpecialTokens,
    next_token: bool,
    rate: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """`masked_lm_example` row by row, each row with its own generator: inputs, targets [B, T]."""
    vocab = specials.vocab_size or int(windows.max()) + 1
    specials_set = set(specials.ids)
    pairs = [
        masked_lm_example(row[None], masking, specials.mask, specials_set, vocab, rng, next_token=next_token, rate=rate)
        for row, rng in zip(windows, rngs, strict=True)
    ]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


def mlm_batch(
    stream: TokenStream,
    slot: BatchSlot,
    seq_len: int,
    masking: Masking,
    next_token: bool = True,
    rate: float | None = None,
    per_document: bool = True,
) -> Batch:
    """Masked-LM micro-batch: random windows of seq_len + 1 tokens, corrupted, bidirectional.

    Targets hold the original token at masked positions only (IGNORE_INDEX elsewhere): masked
    *next*-token prediction by default, in place with ``next_token=False``. With `per_document`,
    `doc_ids` keeps attention inside documents, and a target whose token lies in another document
    than its position (the first token after an <eos>) is ignored.
    """
    starts = random_starts(len(stream), seq_len + 1, slot, stream_id("mlm"))
    return masked_windows(
        stream, starts, seq_len, row_rngs(slot, stream_id("mlm-mask")), masking, next_token, rate, per_document
    )


def masked_windows(
    stream: TokenStream,
    starts: np.ndarray,
    seq_len: int,
    rngs: list[np.random.Generator],
    masking: Masking,
    next_token: bool = True,
    rate: float | None = None,
    per_document: bool = True,
) -> Batch:
    """The windows of seq_len + 1 tokens at `starts`, masked row by row with `rngs` (see `mlm_batch`)."""
    specials = need_specials(stream)
    windows = read_windows(stream.tokens, starts, seq_len + 1)
    inputs, targets = mask_rows(windows, rngs, masking, specials, next_token, rate)
    doc_ids = None
    if per_document:
        docs = document_ids(stream, starts, windows)
        if next_token:  # a document's first token is not predicted (nothing before it sees it): unmask it
            crossing = docs[:, 1:] != docs[:, :-1]
            targets[crossing] = IGNORE_INDEX
            inputs[:, 1:][crossing[:, :-1]] = windows[:, 1:-1][crossing[:, :-1]]
        doc_ids = _tensor(docs[:, :-1])
    return Batch(_tensor(inputs), _tensor(targets), "bidirectional", doc_ids)


def doc_offsets(stream: TokenStream) -> np.ndarray:
    """Document start offsets plus the end of the stream ([n_docs + 1])."""
    if stream.doc_starts is not None:
        offsets = np.asarray(stream.doc_starts, dtype=np.int64)
        return offsets if offsets[-1] == len(stream) else np.append(offsets, len(stream))
    if stream.eos_id is not None:
        ends = np.flatnonzero(np.asarray(stream.tokens) == stream.eos_id) + 1
        return np.unique(np.concatenate([[0], ends, [len(stream)]]))
    return np.array([0, len(stream)], dtype=np.int64)


def nsp_batch(
    stream: TokenStream,
    slot: BatchSlot,
    seq_len: int,
    masking: Masking | None = None,
    next_token: bool = True,
    rate: float | None = None,
) -> Batch:
    """Next-sentence-prediction micro-batch: ``<bos> A <sep> B <eos>`` pairs of seq_len + 1 tokens.

    ``extras["nsp_labels"]`` [B] is 1 where B truly follows A; ``extras["pair_ids"]`` holds the pairs
    unmasked and ``extras["sep_pos"]`` [B] where their <sep> is (for `flashlm.model.heads.NSPHead`). The pair is
    document 0 and its padding document 1 in `doc_ids`, so no real token attends to padding. With
    `masking`, the pair also carries MLM masks (targets at masked tokens only); without, every target
    is ignored.
    """
    mask_rngs = row_rngs(slot, stream_id("nsp-mask")) if masking is not None else None
    return nsp_pairs(stream, seq_len, row_rngs(slot, stream_id("nsp")), masking, mask_rngs, next_token, rate)


def nsp_pairs(
    stream: TokenStream,
    seq_len: int,
    rngs: list[np.random.Generator],
    masking: Masking | None = None,
    mask_rngs: list[np.random.Generator] | None = None,
    next_token: bool = True,
    rate: float | None = None,
) -> Batch:
    """One NSP pair per generator in `rngs` (masked with `mask_rngs` when `masking`); see `nsp_batch`."""
    specials = need_specials(stream)
    offsets = doc_offsets(stream)
    if len(offsets) < 3:
        raise DataError("next-sentence prediction needs at least two documents in the token stream")
    if seq_len < 4:
        raise DataError(f"train.seq_len: {seq_len} is too short for <bos> A <sep> B <eos> pairs; use >= 4")
    pairs, labels, lengths = [], [], []
    for rng in rngs:
        seq, label, n = nsp_pair(
            stream.tokens, offsets, seq_len + 1, rng, specials.bos, specials.sep, specials.eos, specials.pad
        )
        pairs.append(seq)
        labels.append(label)
        lengths.append(n)
    windows = np.stack(pairs)
    clean = windows[:, :-1]
    if masking is not None and mask_rngs is not None:
        inputs, targets = mask_rows(windows, mask_rngs, masking, specials, next_token, rate)
    else:
        inputs, targets = clean, np.full((len(windows), seq_len), IGNORE_INDEX, dtype=np.int64)
    docs = (np.arange(seq_len)[None] >= np.asarray(lengths)[:, None]).astype(np.int64)
    seps = (clean == specials.sep).argmax(1)
    return Batch(
        _tensor(inputs),
        _tensor(targets),
        "bidirectional",
        _tensor(docs),
        extras={
            "nsp_labels": torch.tensor(labels, dtype=torch.int64),
            "pair_ids": _tensor(clean),
            "sep_pos": torch.as_tensor(seps, dtype=torch.int64),
        },
    )


def prefix_lm_batch(
    stream: TokenStream, slot: BatchSlot, seq_len: int, packed: bool = False, min_prefix: int = 1
) -> Batch:
    """Prefix-LM micro-batch: each window split at a random point p in [min_prefix, seq_len - 1].

    Inputs ``[:p]`` attend bidirectionally (``prefix_len = p``), the rest causally; only the targets
    at positions >= p - 1 (the tokens after the prefix) carry loss. With `packed`, attention and
    targets stay inside documents as in `causal_batch`.
    """
    if seq_len < 2:
        raise DataError(f"train.seq_len: {seq_len} is too short for prefix LM; use >= 2")
    starts = random_starts(len(stream), seq_len + 1, slot, stream_id("prefix_lm"))
    batch = causal_batch(stream, starts, seq_len, packed)
    low = min(max(min_prefix, 1), seq_len - 1)
    split = np.array([rng.integers(low, seq_len) for rng in row_rngs(slot, stream_id("prefix_lm-split"))])
    in_prefix = np.arange(seq_len)[None] < (split[:, None] - 1)
    batch.targets[torch.from_numpy(in_prefix)] = IGNORE_INDEX
    batch.mode, batch.prefix_len = "prefix", torch.from_numpy(split.astype(np.int64))
    return batch

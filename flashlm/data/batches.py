"""Batch makers: deterministic, resumable sampling of training batches.

A step's *global batch* holds ``world × batch_size × grad_accum`` rows. Its window starts are drawn
from a generator seeded with ``(seed, step, stream)`` only, and the rank ``r`` at micro-step ``m``
takes rows ``[(m·world + r)·B, (m·world + r + 1)·B)``. So

- batch k is a pure function of k: resuming needs only the step, never an iterator's state;
- the rows a step trains on do not depend on how they are split over ranks and micro-steps
  (2 ranks × B rows draw exactly the rows that 1 rank × 2B rows draws).

A batch maker returns a `Batch`; other objectives (masked LM, NSP, prefix LM, distillation) are
further batch makers that fill ``mode``, ``prefix_len`` and ``extras`` as they need.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

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
        return replace(self, input_ids=move(self.input_ids), targets=move(self.targets),
                       doc_ids=move(self.doc_ids), prefix_len=move(self.prefix_len),
                       extras={k: move(v) for k, v in self.extras.items()})

    @property
    def num_tokens(self) -> int:
        """Input positions in the batch (B × T)."""
        return self.input_ids.numel()


@dataclass(frozen=True)
class TokenStream:
    """A split's tokens as one 1-D array (a memmap is never read whole) and its document bounds.

    Document boundaries come from `doc_starts` (sorted start offsets) when given, else from `eos_id`
    (a document ends with its <eos>); with neither, the stream is one document.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray | None = None
    eos_id: int | None = None

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
        raise DataError(f"the token stream has {n_tokens} tokens, fewer than one window of {span}; "
                        "use more data or a shorter train.seq_len")
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
        raise DataError(f"the validation stream has {n_tokens} tokens, fewer than one window of "
                        f"{seq_len + 1}; use more validation data or a shorter train.seq_len")
    chosen = np.arange(fit) if count >= fit else np.arange(count) * fit // count
    return chosen.astype(np.int64) * seq_len


def eval_batches(stream: TokenStream, seq_len: int, batch_size: int, count: int, rank: int = 0,
                 world: int = 1, packed: bool = False) -> Iterator[Batch]:
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

"""Language-modelling evaluation: perplexity / bits per byte with a sliding window, and LAMBADA-style cloze.

Perplexity follows the "perplexity of fixed-length models" scheme: every document is framed
``<bos> … <eos>``, as the training shards frame it (`flashlm.data.shards`), and its `<eos>` is scored
like any other token (the model learnt where documents end); bits per byte divide by the UTF-8 bytes
of the text alone, as the shards' ``text_bytes`` do. Documents longer than the window are covered by
windows starting every `stride` tokens, and each window scores only the tokens no earlier window
scored, so every token is scored exactly once, with at least `seq_len - stride` tokens of left context
(all of it inside the first window). Windows of many documents are batched with right padding that
carries no loss, so the numbers do not depend on the batch size (sums are taken in float64).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flashlm.errors import ConfigError, DataError
from flashlm.evaluate.metrics import bits_per_byte, utf8_bytes
from flashlm.evaluate.metrics import perplexity as ppl_of

IGNORE = -100
Row = tuple[list[int], list[int]]  # (input ids, targets with IGNORE where not scored)


@dataclass
class RowScore:
    """Teacher-forced score of one row: summed nats, scored tokens, tokens the argmax got right."""

    nats: float
    tokens: int
    correct: int

    @property
    def all_correct(self) -> bool:
        """Greedy decoding reproduces the scored tokens exactly iff every argmax matches."""
        return self.tokens > 0 and self.correct == self.tokens


# ---- scoring core -------------------------------------------------------------------------------
def collate(rows: Sequence[Row], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows into [B, T] inputs and targets (padding targets are IGNORE)."""
    width = max(len(inputs) for inputs, _ in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        inputs[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        targets[i, : len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, targets


@torch.no_grad()
def score_rows(model: Any, rows: Sequence[Row], pad_id: int = 0) -> list[RowScore]:
    """Run the causal model once over right-padded rows and score each row's non-IGNORE targets."""
    device = next(model.parameters()).device
    inputs, targets = collate(rows, pad_id)
    inputs, targets = inputs.to(device), targets.to(device)
    logits = model(inputs, mode="causal").logits.float()
    nats = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    scored = targets != IGNORE
    hits = (logits.argmax(-1) == targets) & scored
    nats = (nats.double() * scored).sum(1)
    return [
        RowScore(float(n), int(s), int(h))
        for n, s, h in zip(nats.tolist(), scored.sum(1).tolist(), hits.sum(1).tolist(), strict=True)
    ]


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- perplexity ---------------------------------------------------------------------------------
def sliding_windows(ids: Sequence[int], seq_len: int, stride: int) -> Iterator[Row]:
    """Windows over one document; `ids[0]` (the `<bos>`) is context only, every later token scored once.

    Window k reads ids[k·stride : e_k] and predicts ids[k·stride + 1 : e_k + 1], e_k = min(k·stride +
    seq_len, n - 1); only targets past the previous window's end are scored.
    """
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"stride must be between 1 and seq_len={seq_len}, got {stride}")
    ids, n = list(ids), len(ids)
    begin, done = 0, 0  # `done`: index of the last target scored so far
    while done < n - 1:
        end = min(begin + seq_len, n - 1)
        targets = ids[begin + 1 : end + 1]
        fresh = end - done
        yield ids[begin:end], [IGNORE] * (len(targets) - fresh) + targets[-fresh:]
        done, begin = end, begin + stride


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Iterable[str],
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    add_eos: bool = True,
) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of `texts`, each a document framed ``<bos> … <eos>``.

    `seq_len` defaults to the model's context, `stride` to half of it. ``add_eos=False`` scores the text's
    own tokens only (the ``<bos>`` is always context, never scored); a tokenizer without an ``<eos>``
    scores no end either. ``bytes`` (and so bits per byte) count the text alone.
    """
    seq_len = seq_len or model.cfg.max_seq_len
    stride = stride or max(1, seq_len // 2)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    counts = {"documents": 0, "bytes": 0}
    add_eos = add_eos and tokenizer.eos_id is not None

    def rows() -> Iterator[Row]:
        for text in texts:
            counts["documents"] += 1
            counts["bytes"] += utf8_bytes(text)
            yield from sliding_windows(tokenizer.encode(text, add_bos=True, add_eos=add_eos), seq_len, stride)

    nats, tokens, windows = 0.0, 0, 0
    for batch in batched(rows(), batch_size):
        for score in score_rows(model, batch, tokenizer.pad_id or 0):
            nats, tokens, windows = nats + score.nats, tokens + score.tokens, windows + 1
    if tokens == 0:
        raise DataError("no tokens to score: the texts are empty")
    return {
        "loss": nats / tokens,
        "ppl": ppl_of(nats, tokens),
        "bpb": bits_per_byte(nats, counts["bytes"]),
        "nats": nats,
        "tokens": tokens,
        "bytes": counts["bytes"],
        "documents": counts["documents"],
        "windows": windows,
        "seq_len": seq_len,
        "stride": stride,
    }


def read_texts(
    paths: str | os.PathLike | Sequence[str | os.PathLike], txt_mode: str = "blank", field: str = "text"
) -> Iterator[str]:
    """Documents of text/JSONL/Parquet files (see `flashlm.data.corpus`); txt files split at blank lines."""
    from flashlm.data.corpus import iter_documents

    return iter_documents(list(paths) if isinstance(paths, (list, tuple)) else paths, txt_mode=txt_mode, field=field)


# ---- cloze (LAMBADA format) ---------------------------------------------------------------------
def cloze_row(tokenizer: Any, line: str, max_len: int) -> Row:
    """(inputs, targets) for one passage: the last word (after the last space) is the scored target.

    The context is encoded with `<bos>` and the word with its leading space, as byte-level BPE splits
    it inside the passage; passages longer than `max_len` inputs lose tokens on the left.
    """
    context, word = line.rsplit(" ", 1)
    target = tokenizer.encode(" " + word)
    seq = (tokenizer.encode(context, add_bos=True) + target)[-(max_len + 1) :]
    return seq[:-1], [IGNORE] * (len(seq) - 1 - len(target)) + target


def cloze(model: Any, tokenizer: Any, lines: Iterable[str], batch_size: int = 8) -> dict[str, float]:
    """Accuracy of greedily predicting every token of each passage's last word, and the word's perplexity."""
    max_len = model.cfg.max_seq_len
    passages = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    for n, line in passages:
        if " " not in line:
            raise DataError(f"cloze line {n} has no space: no context before the target word")
    if not passages:
        raise DataError("no cloze passages: the input is empty")
    rows = [cloze_row(tokenizer, line, max_len) for _, line in passages]
    hits, nats, tokens = 0, 0.0, 0
    for batch in batched(rows, batch_size):
        for score in score_rows(model, batch, tokenizer.pad_id or 0):
            hits, nats, tokens = hits + score.all_correct, nats + score.nats, tokens + score.tokens
    return {
        "accuracy": hits / len(rows),
        "target_ppl": ppl_of(nats, tokens),
        "target_loss": nats / tokens,
        "passages": len(rows),
        "target_tokens": tokens,
    }


__all__ = [
    "IGNORE",
    "RowScore",
    "batched",
    "cloze",
    "cloze_row",
    "collate",
    "perplexity",
    "read_texts",
    "score_rows",
    "sliding_windows",
]

"""Long-range dependency tasks generated in code: passkey retrieval and MQAR, items and scoring.

Passkey (landmark attention): filler sentences, "The pass key is K. Remember it. K is the pass key." at a
chosen depth, then "What is the pass key? The pass key is" and the answer " K". Items are built with any
encoder that has `encode(text)` and `bos_id`: a trained BPE `Tokenizer` (to test a pre-trained model), or
`PasskeyVocab`, a 40-token word-level vocabulary of exactly these texts (digits one token each), so a
small model can be trained on the task in minutes with no tokenizer and a key of d digits is always d
tokens. Lengths are model-input widths: a row reads the prompt plus all but the last answer token.

MQAR (Zoology): `k1 v1 k2 v2 …` with keys from [1, V/2) and values from [V/2, V), then a region of
token 0 where every key is queried once at a random even offset; the target at a query is its value.

Rows are scored teacher-forced: greedy decoding yields the answer iff every answer-position argmax
matches, so one forward pass per batch gives the exact-match accuracy.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flashlm.errors import ConfigError
from flashlm.evaluate.lm import IGNORE, Row, batched, collate, score_rows

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
_WORDS = re.compile(r"\d|[A-Za-z]+|[^\sA-Za-z\d]")


# ---- passkey ------------------------------------------------------------------------------------
class PasskeyVocab:
    """Word-level vocabulary of the passkey texts: <pad> <bos> <eos>, their words and marks, digits 0-9."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self) -> None:
        words = _WORDS.findall(" ".join((*FILLER, NEEDLE.format(key=""), QUESTION)))
        symbols = ["<pad>", "<bos>", "<eos>", *dict.fromkeys(words), *map(str, range(10))]
        self.symbols = list(dict.fromkeys(symbols))
        self.ids = {s: i for i, s in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        try:
            ids = [self.ids[w] for w in _WORDS.findall(text)]
        except KeyError as exc:
            raise ConfigError(f"PasskeyVocab has no token {exc.args[0]!r}") from None
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.symbols[i] for i in ids if i > self.eos_id)


@dataclass
class PasskeyExample:
    """One passkey item; `needle_start` indexes `prompt_ids`; `depth` is the needle's place in the filler."""

    prompt_ids: list[int]
    answer_ids: list[int]
    key: int
    depth: float
    needle_start: int

    def row(self) -> Row:
        """(inputs, targets): reads prompt + answer[:-1], scored on the answer tokens only."""
        seq = self.prompt_ids + self.answer_ids
        targets = [IGNORE] * (len(self.prompt_ids) - 1) + self.answer_ids
        return seq[:-1], targets


def passkey_example(tok: Any, length: int, depth: float, key: int) -> PasskeyExample:
    """A passkey item whose row is exactly `length` tokens wide, the needle nearest `depth` ∈ [0, 1].

    The needle goes between filler sentences; the filler is cut (at the token level) to fit the budget.
    """
    needle = tok.encode(" " + NEEDLE.format(key=key))
    question = tok.encode(" " + QUESTION)
    answer = tok.encode(f" {key}")
    n_fill = length + 1 - len(answer) - 1 - len(needle) - len(question)
    if n_fill < 0:
        raise ConfigError(
            f"passkey length {length} is too short: the needle and question alone take {length - n_fill} tokens"
        )
    filler, bounds = _filler(tok, n_fill)
    cut = min(bounds, key=lambda b: abs(b - depth * n_fill))
    prompt = [tok.bos_id, *filler[:cut], *needle, *filler[cut:], *question]
    return PasskeyExample(prompt, answer, key, cut / max(n_fill, 1), 1 + cut)


def _filler(tok: Any, n_tokens: int) -> tuple[list[int], list[int]]:
    """`n_tokens` of repeated filler sentences and the token offsets of sentence boundaries (0 … n)."""
    sentences = itertools.cycle([tok.encode(" " + s) for s in FILLER])
    filler: list[int] = []
    bounds = [0]
    while len(filler) < n_tokens:
        filler += next(sentences)
        bounds.append(len(filler))
    return filler[:n_tokens], [b for b in bounds if b < n_tokens] + [n_tokens]


def random_key(rng: random.Random, digits: int = 5) -> int:
    return rng.randrange(10 ** (digits - 1), 10**digits)


def make_passkey_batch(
    rng: random.Random, tok: Any, batch_size: int, seq_len: int, depth: float | None = None, digits: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch: inputs [B, seq_len] and targets with IGNORE except at the answer tokens.

    `depth` None draws a uniform depth per row.
    """
    rows = [
        passkey_example(tok, seq_len, rng.random() if depth is None else depth, random_key(rng, digits)).row()
        for _ in range(batch_size)
    ]
    return collate(rows, tok.pad_id or 0)


def passkey_accuracy(
    model: Any,
    tok: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 10,
    seed: int = 0,
    digits: int = 5,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Exact-match accuracy of the key for every (length, depth) cell, `samples` random keys a cell."""
    rng = random.Random(seed)
    grid = [
        [_passkey_cell(model, tok, length, depth, samples, rng, digits, batch_size) for depth in depths]
        for length in lengths
    ]
    overall = sum(map(sum, grid)) / (len(lengths) * len(depths))
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "accuracy": grid,
        "overall": overall,
        "samples": samples,
        "digits": digits,
    }


def _passkey_cell(
    model: Any,
    tok: Any,
    length: int,
    depth: float,
    samples: int,
    rng: random.Random,
    digits: int,
    batch_size: int,
) -> float:
    rows = [passkey_example(tok, length, depth, random_key(rng, digits)).row() for _ in range(samples)]
    hits = sum(s.all_correct for batch in batched(rows, batch_size) for s in score_rows(model, batch, tok.pad_id or 0))
    return hits / samples


# ---- MQAR ---------------------------------------------------------------------------------------
def mqar_example(rng: random.Random, vocab_size: int, seq_len: int, n_pairs: int) -> Row:
    """One MQAR row of `seq_len` inputs: pairs, then each key queried once; targets only at queries."""
    _check_mqar(vocab_size, seq_len, n_pairs)
    half = vocab_size // 2
    keys, values = rng.sample(range(1, half), n_pairs), rng.sample(range(half, vocab_size), n_pairs)
    inputs = [tok for pair in zip(keys, values, strict=True) for tok in pair] + [0] * (seq_len - 2 * n_pairs)
    targets = [IGNORE] * seq_len
    slots = rng.sample(range((seq_len - 2 * n_pairs) // 2), n_pairs)
    for slot, k, v in zip(slots, keys, values, strict=True):
        pos = 2 * n_pairs + 2 * slot
        inputs[pos], targets[pos] = k, v
    return inputs, targets


def _check_mqar(vocab_size: int, seq_len: int, n_pairs: int) -> None:
    if n_pairs < 1 or n_pairs > vocab_size // 2 - 1:
        raise ConfigError(f"MQAR needs 1 <= n_pairs <= vocab_size/2 - 1 = {vocab_size // 2 - 1}, got {n_pairs}")
    if seq_len < 4 * n_pairs:
        raise ConfigError(f"MQAR seq_len {seq_len} is too short for {n_pairs} pairs (needs {4 * n_pairs})")


def make_mqar_batch(
    rng: random.Random, batch_size: int, vocab_size: int, seq_len: int, n_pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch: inputs [B, seq_len] and targets with IGNORE except at the query positions."""
    return collate([mqar_example(rng, vocab_size, seq_len, n_pairs) for _ in range(batch_size)])


def mqar_accuracy(
    model: Any,
    settings: Sequence[tuple[int, int]] = ((256, 16), (512, 32)),
    vocab_size: int | None = None,
    samples: int = 64,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Accuracy over query positions for each (seq_len, n_pairs); vocab defaults to min(model vocab, 8192)."""
    vocab_size = vocab_size or min(model.cfg.vocab_size, 8192)
    if vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"MQAR vocab_size {vocab_size} exceeds the model's {model.cfg.vocab_size}")
    rng = random.Random(seed)
    rows_out = []
    for seq_len, n_pairs in settings:
        rows = [mqar_example(rng, vocab_size, seq_len, n_pairs) for _ in range(samples)]
        scores = [s for batch in batched(rows, batch_size) for s in score_rows(model, batch)]
        correct, total = sum(s.correct for s in scores), sum(s.tokens for s in scores)
        rows_out.append({"seq_len": seq_len, "n_pairs": n_pairs, "accuracy": correct / total, "queries": total})
    return {
        "vocab_size": vocab_size,
        "settings": rows_out,
        "mean": sum(r["accuracy"] for r in rows_out) / len(rows_out),
    }


__all__ = [
    "FILLER",
    "NEEDLE",
    "QUESTION",
    "PasskeyExample",
    "PasskeyVocab",
    "make_mqar_batch",
    "make_passkey_batch",
    "mqar_accuracy",
    "mqar_example",
    "passkey_accuracy",
    "passkey_example",
    "random_key",
]

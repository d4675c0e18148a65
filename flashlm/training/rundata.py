"""The token streams a pre-training run reads: memory-mapped train (and validation) shards, checked
against the model and the tokenizer, with the special ids the masked objectives need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flashlm.config import TrainConfig
from flashlm.data.batches import SpecialTokens, TokenStream
from flashlm.errors import ConfigError, DataError


@dataclass
class Data:
    train: TokenStream
    val: TokenStream | None
    bytes_per_token: float | None  # of the validation text, for bits per byte
    tokenizer_file: Path | None  # copied into every checkpoint


def open_stream(shards: Any, specials: SpecialTokens | None = None) -> TokenStream:
    offsets = getattr(shards, "doc_offsets", None)
    eos = shards.meta.get("eos_id") if isinstance(getattr(shards, "meta", None), dict) else None
    return TokenStream(shards.tokens, None if offsets is None else np.asarray(offsets), eos, specials)


def special_tokens(tokenizer_file: Path | None) -> SpecialTokens | None:
    """The special ids the masked objectives need, from the run's tokenizer (None when it lacks them)."""
    from flashlm.tokenizer import Tokenizer

    if tokenizer_file is None:
        return None
    try:
        return SpecialTokens.from_tokenizer(Tokenizer.load(tokenizer_file))
    except DataError:
        return None


def bytes_per_token(shards: Any) -> float | None:
    """UTF-8 bytes per token of a split (its text bytes over its tokens); None when unknown.

    Bits per byte then read total nats / (ln 2 · bytes): exact when evaluation covers the split,
    an estimate from the split's average bytes/token when it covers a sample of windows.
    """
    try:
        n_bytes = int(shards.text_bytes)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    n_tokens = len(shards.tokens)
    return n_bytes / n_tokens if n_bytes > 0 and n_tokens else None


def open_data(tcfg: TrainConfig, vocab_size: int) -> Data:
    """Memory-mapped train (and validation) shards, checked against the model and tokenizer."""
    from flashlm.data.shards import TokenShards

    if not tcfg.data or not Path(tcfg.data).is_dir():
        raise DataError(
            f"train.data: {tcfg.data or 'not set'} is not a directory; point it at token shards "
            "from `flashlm data prepare`, e.g. --set train.data=DIR"
        )
    train = TokenShards(tcfg.data, split="train")
    val = _open_val(tcfg)
    tokenizer_file = _tokenizer_file(tcfg, train)
    top = int(train.meta.get("vocab_size", 0) or 0)
    if top > vocab_size:
        raise ConfigError(
            f"model.vocab_size: {vocab_size} is smaller than the shards' vocabulary ({top}); "
            f"set model.vocab_size to at least {top}"
        )
    specials = special_tokens(tokenizer_file)
    if val is None or len(val.tokens) < tcfg.seq_len + 1:  # no full evaluation window (val_fraction 0)
        return Data(open_stream(train, specials), None, None, tokenizer_file)
    return Data(
        open_stream(train, specials),
        open_stream(val, specials),
        bytes_per_token(val) or bytes_per_token(train),
        tokenizer_file,
    )


def _open_val(tcfg: TrainConfig) -> Any:
    from flashlm.data.shards import TokenShards

    try:
        return TokenShards(tcfg.val_data or tcfg.data, split="val")
    except DataError:
        if tcfg.val_data:
            raise
        return None


def _tokenizer_file(tcfg: TrainConfig, shards: Any) -> Path | None:
    """train.tokenizer, else the shard directory's tokenizer.json (if any), checked against the shards."""
    from flashlm.tokenizer import TOKENIZER_FILE, Tokenizer

    path = Path(tcfg.tokenizer or tcfg.data)
    path = path / TOKENIZER_FILE if path.is_dir() else path
    if not path.is_file():
        if tcfg.tokenizer:
            raise ConfigError(f"train.tokenizer: no tokenizer at {path}; pass a tokenizer.json or its folder")
        return None
    shards.check_tokenizer(Tokenizer.load(path))
    return path

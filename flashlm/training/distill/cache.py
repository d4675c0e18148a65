"""The top-k logit cache on disk: its files and `LogitCache`, which reads a finished one (memory-mapped).

The cache (built by `flashlm.training.distill.caching.build_logit_cache`) stores, for every position i of a token
stream, the teacher's top-k prediction of token i + 1. The teacher reads the stream in windows of ``seq_len``
tokens that advance by ``stride`` (default ``seq_len // 2``) and keeps the predictions of each window's last
``stride`` positions, so every position (after the stream's first window) was predicted with at least
``seq_len − stride`` tokens of context; ``stride = seq_len`` (consecutive windows) halves the cost but gives
the first positions of each window almost no context. Training windows start at any offset s and read cache
positions s … s + T − 1, so a student window sees a different left context than the teacher did. That is
the price of an any-offset cache (DistillKit-style offline distillation): the teacher's prediction is still a
prediction of the same target token, only from its own context.

Files in a cache directory: ``meta.json`` (format, version, settings, ``complete``), ``progress.json`` (the
positions done while building), ``ids.bin`` and ``logprobs.bin`` ([N, k] raw arrays) and the teacher's
``tokenizer.json`` when it had one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from flashlm.errors import DataError
from flashlm.training.distill.vocab import TOKENIZER_FILE, _vocab_from_file

CACHE_FORMAT, CACHE_VERSION = "flashlm-logit-cache", 1
CACHE_META, CACHE_PROGRESS = "meta.json", "progress.json"
CACHE_IDS, CACHE_LOGPROBS = "ids.bin", "logprobs.bin"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


class LogitCache:
    """A finished top-k cache: per stream position, the teacher's top-k ids and log-probs (memory-mapped)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory)
        if not (self.path / CACHE_META).is_file():
            raise DataError(f"{self.path}: no logit cache here; build one with `flashlm distill cache`")
        self.meta = _read_json(self.path / CACHE_META)
        if self.meta.get("format") != CACHE_FORMAT or self.meta.get("version") != CACHE_VERSION:
            raise DataError(f"{self.path}: not a version-{CACHE_VERSION} FlashLM logit cache")
        if not self.meta.get("complete"):
            done = (
                _read_json(self.path / CACHE_PROGRESS).get("positions", 0)
                if (self.path / CACHE_PROGRESS).is_file()
                else 0
            )
            raise DataError(
                f"{self.path}: the cache is incomplete ({done}/{self.n_positions} positions); "
                "rerun `flashlm distill cache` with the same arguments to finish it"
            )
        shape = (self.n_positions, self.top_k)
        meta = self.meta
        self.ids = _open_array(self.path / CACHE_IDS, np.dtype(meta["ids_dtype"]), shape, "r")
        self.logprobs = _open_array(self.path / CACHE_LOGPROBS, np.dtype(meta["logprobs_dtype"]), shape, "r")

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def seq_len(self) -> int:
        """The teacher's window length when the cache was built."""
        return int(self.meta["seq_len"])

    @property
    def stride(self) -> int:
        """How far the teacher's windows advanced (each position had >= seq_len − stride tokens of context)."""
        return int(self.meta.get("stride", self.seq_len))

    @property
    def n_positions(self) -> int:
        return int(self.meta["n_positions"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes per stream position: k·(id bytes + 2)."""
        return int(self.meta["bytes_per_token"])

    def __len__(self) -> int:
        return self.n_positions

    @property
    def vocab(self) -> dict[str, int] | None:
        """The teacher's vocabulary (from the tokenizer.json copied into the cache), if it had one."""
        return _vocab_from_file(self.path / TOKENIZER_FILE)

    def lookup(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows of `length` positions from each stream offset in `starts`: ids (int32) and log-probs
        (float16), each [len(starts), length, k]. Position s + j predicts stream token s + j + 1."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if len(starts) and (starts.min() < 0 or starts.max() + length > self.n_positions):
            raise DataError(
                f"{self.path}: windows [{starts.min()}, {starts.max() + length}) run past the "
                f"cache's {self.n_positions} positions; built from other shards or split?"
            )
        index = starts[:, None] + np.arange(length, dtype=np.int64)
        return self.ids[index].astype(np.int32), np.asarray(self.logprobs[index])


def _open_array(path: Path, dtype: np.dtype, shape: tuple[int, int], mode: str) -> np.ndarray:
    if mode == "r" and (not path.is_file() or path.stat().st_size != shape[0] * shape[1] * dtype.itemsize):
        raise DataError(f"{path} is missing or has the wrong size; rebuild the cache")
    if shape[0] * shape[1] == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)

"""Tokenize a corpus into memory-mapped token shards with a document index.

Layout of a shard directory, per split (``train``, ``val``):
  * ``{split}.bin``: the token ids of every document framed ``<bos> … <eos>`` (as Gemma and Llama
    train; ``<bos>`` only when the tokenizer has one), uint16 (vocab <= 65536) or uint32, native
    little-endian, no header. Generation, serving, ``eval ppl`` and exported tokenizers put the same
    ``<bos>`` before a text.
  * ``{split}.idx``: int64 offsets into ``.bin``: the start of every document, then the end.
  * ``meta.json``: format version, dtype, vocab size, bos and eos ids, tokenizer fingerprint and, per split,
    ``docs``, ``tokens`` and ``text_bytes`` (UTF-8 bytes of the document texts, separators excluded,
    for bits-per-byte).

`prepare_shards` streams: documents are read lazily, tokenized in bounded chunks (by a pool of
worker processes, or in this process where `tokenizers` uses its own threads), and appended to
files under temporary names that are renamed when everything is written, ``meta.json`` last.
Memory stays flat whatever the corpus size. Document ``i`` (counting non-empty documents in input
order) goes to val when ``i == 1`` or ``frac(i * golden ratio) < val_fraction`` (``i >= 1``): a
deterministic, evenly spread sample of about ``val_fraction`` of the documents, never the first
one, and at least one as soon as there are two documents.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from flashlm.data.corpus import iter_documents, resolve_files
from flashlm.data.fast_bpe import BatchEncoder, tiktoken_batch_encoder
from flashlm.errors import ConfigError, DataError
from flashlm.tokenizer import TOKENIZER_FILE, Tokenizer

FORMAT = "flashlm-token-shards"
VERSION = 1
SPLITS = ("train", "val")
META_FILE = "meta.json"
CHUNK_DOCS = 1024
CHUNK_CHARS = 4_000_000  # a chunk also ends once its documents hold this many characters
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio

Chunk = tuple[int, list[str]]  # (index of the first document, documents)
Part = tuple[np.ndarray, np.ndarray, int]  # (tokens, document lengths incl. bos and eos, text bytes)


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def val_mask(indices: np.ndarray, val_fraction: float) -> np.ndarray:
    """Whether each document index goes to the val split (see the module docstring)."""
    indices = np.asarray(indices, dtype=np.uint64)
    threshold = np.uint64(min(int(val_fraction * 2.0**64), 2**64 - 1))
    return (indices >= 1) & (((indices * _GOLDEN) < threshold) | (indices == 1)) & (val_fraction > 0)


# ---- writing ------------------------------------------------------------------------------------
def prepare_shards(
    inputs: Any,
    tokenizer: Tokenizer | str | os.PathLike,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.01,
    workers: int | None = None,
    chunk_docs: int = CHUNK_DOCS,
    txt_mode: str = "line",
    field: str = "text",
    progress: bool = True,
    encoder: str = "auto",
) -> dict:
    """Tokenize ``inputs`` (anything `iter_documents` reads) into shards in ``out_dir``; return the meta.

    ``encoder``: "tokenizers", "tiktoken" (the same ids through `tiktoken`, see `flashlm.data.fast_bpe`)
    or "auto": tiktoken when it can express the tokenizer and gives `tokenizers`' ids on the corpus's
    first chunk, else tokenizers. The meta records which one ran.

    ``workers``: tokenizing processes; 1 tokenizes in this process (with `tokenizers`' threads).
    None picks 1 on machines with at most 2 CPUs (there `tokenizers`' own threads keep up with worker
    processes, at a fraction of the memory; see docs/benchmarks.md) and ``min(cpus, 8)`` processes above.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    _check_args(tok, val_fraction, workers, chunk_docs, encoder)
    documents = iter_documents(inputs, txt_mode=txt_mode, field=field)
    chunks = _chunks(documents, chunk_docs)
    first = list(itertools.islice(chunks, 2))  # reads ahead: an empty corpus fails before any file is made
    chunks = itertools.chain(first, chunks)
    n_workers = 1 if len(first) < 2 else (workers or _default_workers())
    dtype = dtype_for(tok.vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = {split: _SplitWriter(out, split, dtype) for split in SPLITS}
    encoder_name, encode = _choose_encoder(encoder, tok, first[0][1] if first else [])
    encoder = _Encoder(encode, (tok.bos_id, tok.eos_id), dtype, val_fraction)
    try:
        with _progress_bar(progress, _input_bytes(inputs)) as advance:
            for result in _encode_all(chunks, encoder, tok.to_str(), n_workers, encoder_name):
                for split, part in result.items():
                    writers[split].append(part)
                advance(sum(part[2] for part in result.values()))
        meta = {**_meta(tok, dtype, val_fraction, writers), "encoder": encoder_name}
        _commit(out, writers, meta, tok)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return meta


def _check_args(tok: Tokenizer, val_fraction: float, workers: int | None, chunk_docs: int, encoder: str) -> None:
    """Every argument checked before a file is made (a refusal leaves nothing behind)."""
    if tok.eos_id is None:
        raise DataError("the tokenizer has no <eos> (or </s>) token to end documents with")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if chunk_docs < 1:
        raise ConfigError(f"chunk_docs must be at least 1, got {chunk_docs}")
    if encoder not in ENCODERS:
        raise ConfigError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _default_workers() -> int:
    cpus = _cpus()
    return 1 if cpus <= 2 else min(cpus, 8)


ENCODERS = ("auto", "tokenizers", "tiktoken")


def _tiktoken(tokenizer_json: str, threads: int) -> BatchEncoder | None:
    """tiktoken's encoder over this BPE with ``threads`` threads (at most 8), or None where it cannot express it."""
    return tiktoken_batch_encoder(tokenizer_json, threads=max(1, min(threads, 8)))


def _batch_encoder(name: str, tokenizer_json: str, threads: int) -> BatchEncoder:
    """Texts -> ids with `tokenizers` (its own thread pool) or tiktoken (``threads`` threads)."""
    if name == "tiktoken":
        encode = _tiktoken(tokenizer_json, threads)
        if encode is None:
            raise ConfigError("encoder 'tiktoken' cannot express this tokenizer; use --encoder tokenizers")
        return encode
    backend = Tokenizer.from_str(tokenizer_json).backend
    return lambda texts: [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]


def _choose_encoder(requested: str, tok: Tokenizer, sample: list[str]) -> tuple[str, BatchEncoder]:
    """The encoder for this process and its name (``requested`` one of `ENCODERS`); "auto" takes tiktoken only
    when its ids equal `tokenizers`' on ``sample`` (the first chunk)."""
    tok_json = tok.to_str()
    if requested != "auto":
        return requested, _batch_encoder(requested, tok_json, _cpus())
    reference = _batch_encoder("tokenizers", tok_json, _cpus())
    fast = _tiktoken(tok_json, _cpus())
    if fast is not None and fast(sample) == reference(sample):
        return "tiktoken", fast
    return "tokenizers", reference


def _chunks(documents: Iterable[str], chunk_docs: int) -> Iterator[Chunk]:
    """Group documents into chunks of at most ``chunk_docs`` documents / about CHUNK_CHARS characters."""
    start, batch, chars = 0, [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= chunk_docs or chars >= CHUNK_CHARS:
            yield start, batch
            start, batch, chars = start + len(batch), [], 0
    if batch:
        yield start, batch


class _Encoder:
    """Turns a chunk of documents into per-split token arrays (runs in workers or in-process)."""

    def __init__(
        self, encode_batch: BatchEncoder, frame: tuple[int | None, int], dtype: np.dtype, val_fraction: float
    ) -> None:
        self.encode_batch, self.frame, self.dtype, self.val_fraction = encode_batch, frame, dtype, val_fraction

    def __call__(self, chunk: Chunk) -> dict[str, Part]:
        start, docs = chunk
        bos, eos = self.frame
        head = [] if bos is None else [bos]
        ids = [[*head, *seq, eos] for seq in self.encode_batch(docs)]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        nbytes = np.fromiter((len(d.encode("utf-8")) for d in docs), dtype=np.int64, count=len(docs))
        is_val = val_mask(np.arange(start, start + len(docs)), self.val_fraction)
        if not is_val.any():
            return {"train": (tokens, lengths, int(nbytes.sum()))}
        token_is_val = np.repeat(is_val, lengths)
        return {
            "train": (tokens[~token_is_val], lengths[~is_val], int(nbytes[~is_val].sum())),
            "val": (tokens[token_is_val], lengths[is_val], int(nbytes[is_val].sum())),
        }


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(
    tokenizer_json: str, encoder: str, frame: tuple[int | None, int], dtype: str, val_fraction: float
) -> None:
    """Pool initializer: one single-threaded tokenizer per worker process."""
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    _WORKER_ENCODER = _Encoder(_batch_encoder(encoder, tokenizer_json, 1), frame, np.dtype(dtype), val_fraction)


def _encode_in_worker(chunk: Chunk) -> dict[str, Part]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(chunk)


@contextmanager
def _start_pool(workers: int, initargs: tuple) -> Iterator[Any]:
    """A process pool: fork on Linux (no ``__main__`` guard needed, like torch's DataLoader), else spawn.

    TOKENIZERS_PARALLELISM is "false" while forking, so children never touch the parent's thread pool
    and `tokenizers` prints no fork warning; the parent's own setting is restored right after.
    """
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
            pool = multiprocessing.get_context(method).Pool(workers, _init_worker, initargs)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        yield pool


def _encode_all(
    chunks: Iterator[Chunk], encoder: _Encoder, tok_json: str, workers: int, encoder_name: str
) -> Iterator[dict]:
    """Encode chunks in order: in this process, or in a spawn pool with a bounded number in flight."""
    if workers == 1:
        yield from map(encoder, chunks)
        return
    initargs = (tok_json, encoder_name, encoder.frame, encoder.dtype.str, encoder.val_fraction)
    with _start_pool(workers, initargs) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _SplitWriter:
    """Appends tokens and document offsets of one split to temporary files."""

    def __init__(self, out: Path, split: str, dtype: np.dtype) -> None:
        self.split, self.dtype = split, dtype
        self.paths = {ext: out / f"{split}.{ext}" for ext in ("bin", "idx")}
        self.tmp = {ext: out / f".{split}.{ext}.tmp" for ext in ("bin", "idx")}
        self.files = {ext: open(self.tmp[ext], "wb") for ext in ("bin", "idx")}  # noqa: SIM115
        self.files["idx"].write(np.zeros(1, dtype=np.int64).tobytes())
        self.docs = self.tokens = self.text_bytes = 0

    def append(self, part: Part) -> None:
        tokens, lengths, nbytes = part
        if not len(lengths):
            return
        self.files["bin"].write(tokens.astype(self.dtype, copy=False).tobytes())
        self.files["idx"].write((self.tokens + np.cumsum(lengths)).astype(np.int64).tobytes())
        self.docs += len(lengths)
        self.tokens += len(tokens)
        self.text_bytes += nbytes

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()

    def abort(self) -> None:
        self.close()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)

    def stats(self) -> dict[str, int]:
        return {"docs": self.docs, "tokens": self.tokens, "text_bytes": self.text_bytes}


def _meta(tok: Tokenizer, dtype: np.dtype, val_fraction: float, writers: dict[str, _SplitWriter]) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "tokenizer_fingerprint": tok.fingerprint,
        "val_fraction": val_fraction,
        "splits": {split: writer.stats() for split, writer in writers.items()},
    }


def _commit(out: Path, writers: dict[str, _SplitWriter], meta: dict, tok: Tokenizer) -> None:
    """Rename the temporary files into place; meta.json goes last so it marks a complete directory.

    The tokenizer is stored beside the shards, so that training finds it and copies it into every
    checkpoint (a model directory is then usable on its own).
    """
    meta_tmp = out / f".{META_FILE}.tmp"
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tokenizer_tmp = out / f".{TOKENIZER_FILE}.tmp"
    tokenizer_tmp.write_text(tok.to_str(), encoding="utf-8")
    (out / META_FILE).unlink(missing_ok=True)
    for writer in writers.values():
        writer.close()
        for ext, tmp in writer.tmp.items():
            tmp.replace(writer.paths[ext])
    tokenizer_tmp.replace(out / TOKENIZER_FILE)
    meta_tmp.replace(out / META_FILE)


def _input_bytes(inputs: Any) -> int | None:
    """Total size of plain-text inputs, for the progress bar (None when unknown)."""
    if not isinstance(inputs, (str, os.PathLike, list, tuple)):
        return None
    files = resolve_files(inputs)
    if any(f.is_dir() or f.name.lower().endswith((".gz", ".parquet", ".arrow")) for f in files):
        return None
    return sum(f.stat().st_size for f in files)


@contextmanager
def _progress_bar(enabled: bool, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(nbytes)``: a rich progress bar with MB/s on stderr, or a no-op."""
    if not enabled:
        yield lambda nbytes: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.progress import TransferSpeedColumn as Speed

    columns = (TextColumn("tokenizing"), BarColumn(), DownloadColumn(), Speed(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("tokenize", total=total)
        yield lambda nbytes: bar.advance(task, nbytes)
        if total is not None:
            bar.update(task, completed=total)


# ---- reading ------------------------------------------------------------------------------------
def read_meta(directory: str | os.PathLike) -> dict:
    """The parsed ``meta.json`` of a shard directory; `DataError` when missing or garbled."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(f"no {META_FILE} in {directory}; run `flashlm data prepare` to make token shards")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or not isinstance(meta.get("splits"), dict):
            raise ValueError("not a FlashLM token-shard meta.json")
        np.dtype(meta["dtype"])
        for split, stats in meta["splits"].items():
            if not all(isinstance(stats.get(k), int) for k in ("docs", "tokens", "text_bytes")):
                raise ValueError(f"split {split!r} lacks docs/tokens/text_bytes counts")
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is garbled ({exc}); re-run `flashlm data prepare`") from None
    if meta.get("version") != VERSION:
        version = meta.get("version")
        raise DataError(f"{path} has shard format version {version}, this FlashLM reads {VERSION}")
    return meta


class TokenShards:
    """One split of a shard directory, memory-mapped (never loaded whole)."""

    def __init__(self, directory: str | os.PathLike, split: str = "train") -> None:
        self.path, self.split = Path(directory), split
        self.meta = read_meta(self.path)
        if split not in self.meta["splits"]:
            raise DataError(f"no split {split!r} in {self.path} (splits: {', '.join(self.meta['splits'])})")
        stats = self.meta["splits"][split]
        self.tokens = self._map(f"{split}.bin", np.dtype(self.meta["dtype"]), stats["tokens"])
        self.doc_offsets = self._map(f"{split}.idx", np.dtype(np.int64), stats["docs"] + 1)
        if self.doc_offsets[-1] != stats["tokens"]:
            idx = self.path / f"{split}.idx"
            raise DataError(f"{idx} does not match {split}.bin; re-run `flashlm data prepare`")

    def _map(self, name: str, dtype: np.dtype, count: int) -> np.ndarray:
        path = self.path / name
        size = path.stat().st_size if path.is_file() else -1
        if size != count * dtype.itemsize:
            found = "missing" if size < 0 else f"{size} bytes"
            expected = count * dtype.itemsize
            raise DataError(f"{path} is {found}, expected {expected} bytes; re-run `flashlm data prepare`")
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of this split's document texts (for bits-per-byte)."""
        return int(self.meta["splits"][self.split]["text_bytes"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["tokenizer_fingerprint"])

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i``, its ``<bos>`` and ``<eos>`` included (a view into the memory map)."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for {self.n_docs} documents")
        i %= self.n_docs
        return self.tokens[int(self.doc_offsets[i]) : int(self.doc_offsets[i + 1])]

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raise `DataError` unless these shards were made with ``tokenizer``."""
        given = tokenizer.fingerprint
        if given != self.fingerprint:
            raise DataError(
                f"shards in {self.path} were made with tokenizer {self.fingerprint[:8]} but {given[:8]} "
                "was given; re-run flashlm data prepare with this tokenizer"
            )

    def __repr__(self) -> str:
        return f"TokenShards({str(self.path)!r}, {self.split!r}, docs={self.n_docs}, tokens={len(self)})"


__all__ = ["FORMAT", "VERSION", "TokenShards", "dtype_for", "prepare_shards", "read_meta", "val_mask"]

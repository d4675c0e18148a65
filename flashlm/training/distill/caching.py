"""Building a logit cache: run an online teacher once over a token stream, in resumable chunks, and store each
position's top-k ids and log-probs (`build_logit_cache`; `cache_teacher` is ``flashlm distill cache``).
The windows and the files are described in `flashlm.training.distill.cache`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from flashlm.errors import ConfigError, DataError, FlashLMError
from flashlm.training.distill.cache import (
    CACHE_FORMAT,
    CACHE_IDS,
    CACHE_LOGPROBS,
    CACHE_META,
    CACHE_PROGRESS,
    CACHE_VERSION,
    LogitCache,
    _open_array,
    _read_json,
    _write_json,
    ids_dtype,
)
from flashlm.training.distill.teachers import CachedTeacher, OnlineTeacher, _check_student_vocab, load_teacher
from flashlm.training.distill.vocab import TOKENIZER_FILE, vocab_fingerprint, vocab_of


def _token_stream(shards: str | os.PathLike | np.ndarray, split: str) -> tuple[np.ndarray, str]:
    if isinstance(shards, np.ndarray):
        return shards.reshape(-1), "<array>"
    from flashlm.data.shards import TokenShards

    return TokenShards(shards, split).tokens, str(Path(shards).resolve())


def _cache_meta(teacher: OnlineTeacher, source: str, split: str, n: int, top_k: int, seq_len: int, stride: int) -> dict:
    id_dtype = ids_dtype(teacher.vocab_size)
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "top_k": top_k,
        "seq_len": seq_len,
        "stride": stride,
        "n_positions": n,
        "vocab_size": teacher.vocab_size,
        "ids_dtype": id_dtype.name,
        "logprobs_dtype": "float16",
        "bytes_per_token": top_k * (id_dtype.itemsize + 2),
        "teacher": teacher.source,
        "shards": source,
        "split": split,
        "tokenizer_fingerprint": vocab_fingerprint(teacher.vocab) if teacher.vocab else None,
        "complete": False,
    }


def _start_or_resume(out: Path, meta: dict, teacher: OnlineTeacher) -> int:
    """Positions already cached in `out` (0 for a fresh cache); refuses a cache built differently."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / CACHE_META
    if meta_path.is_file():
        old = _read_json(meta_path)
        settings = {k: v for k, v in old.items() if k != "complete"}
        if settings != {k: v for k, v in meta.items() if k != "complete"}:
            changed = [k for k in meta if k != "complete" and old.get(k) != meta[k]]
            raise DataError(
                f"{out} holds a cache built with other settings ({', '.join(changed)}); "
                "choose another output directory or delete it"
            )
        if old.get("complete"):
            return meta["n_positions"]
        if (out / CACHE_PROGRESS).is_file() and _arrays_present(out, meta):
            return int(_read_json(out / CACHE_PROGRESS).get("positions", 0))
    _write_json(meta_path, meta)
    if teacher.tokenizer_file is not None:
        shutil.copyfile(teacher.tokenizer_file, out / TOKENIZER_FILE)
    shape = (meta["n_positions"], meta["top_k"])
    for name, dtype in ((CACHE_IDS, meta["ids_dtype"]), (CACHE_LOGPROBS, meta["logprobs_dtype"])):
        _open_array(out / name, np.dtype(dtype), shape, "w+")
    _write_json(out / CACHE_PROGRESS, {"positions": 0})
    return 0


def _arrays_present(out: Path, meta: dict) -> bool:
    n = meta["n_positions"] * meta["top_k"]
    return all(
        (out / name).is_file() and (out / name).stat().st_size == n * np.dtype(dtype).itemsize
        for name, dtype in ((CACHE_IDS, meta["ids_dtype"]), (CACHE_LOGPROBS, meta["logprobs_dtype"]))
    )


def _teacher_topk(
    teacher: OnlineTeacher, tokens: np.ndarray, start: int, stop: int, seq_len: int, stride: int, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids, fp16 log-probs) [stop − start, k] for stream positions [start, stop), `start` a multiple of
    `stride`: the block [p, p + stride) is read by the window ``tokens[max(0, p + stride − seq_len) : p +
    stride]``, one window a row (right-padded: causal attention never looks ahead)."""
    blocks = range(start, stop, stride)
    rows = np.zeros((len(blocks), seq_len), dtype=np.int64)
    keep = []
    for row, p in enumerate(blocks):
        lo, end = max(0, p + stride - seq_len), min(p + stride, stop)
        rows[row, : end - lo] = tokens[lo:end]
        keep.append((row, p - lo, end - p))
    logprobs = teacher(torch.from_numpy(rows)).logits.float().log_softmax(-1)
    values, indices = logprobs.topk(top_k, dim=-1)
    values = values.clamp_min(torch.finfo(torch.float16).min)
    ids = torch.cat([indices[r, o : o + c] for r, o, c in keep])
    lps = torch.cat([values[r, o : o + c] for r, o, c in keep])
    return ids.cpu().numpy(), lps.half().cpu().numpy()


@contextmanager
def _progress_bar(enabled: bool, total: int, done: int) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from flashlm.training.progress import progress_bar

    with progress_bar(
        TextColumn("caching teacher logits"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task("cache", total=total, completed=done)
        yield lambda n: bar.advance(task, n)


def build_logit_cache(
    teacher: OnlineTeacher,
    shards: str | os.PathLike | np.ndarray,
    out_dir: str | os.PathLike,
    top_k: int = 64,
    seq_len: int | None = None,
    batch_size: int = 8,
    split: str = "train",
    progress: bool = True,
    stride: int | None = None,
) -> LogitCache:
    """Run `teacher` once over a token stream and store each position's top-k ids and log-probs.

    `shards` is a shard directory (its `split`) or a 1-D token array. The teacher reads windows of `seq_len`
    tokens (default: its context, at most 2048) advancing by `stride` (default ``seq_len // 2``; `seq_len` for
    consecutive windows at half the cost), `batch_size` windows a chunk; after each chunk the arrays are
    flushed and ``progress.json`` records the positions done, so a rerun with the same arguments continues
    where an interrupted one stopped (and yields the same bytes).
    Files: ids.bin [N, k] (uint16 when the vocabulary fits, else int32), logprobs.bin [N, k] float16,
    meta.json (with ``bytes_per_token`` = k·(id bytes + 2), 256 for k = 64), tokenizer.json.
    """
    tokens, source = _token_stream(shards, split)
    seq_len = seq_len or min(teacher.max_seq_len, 2048)
    if seq_len > teacher.max_seq_len:
        raise ConfigError(f"seq_len {seq_len} exceeds the teacher's context of {teacher.max_seq_len} tokens")
    if not 0 < top_k <= teacher.vocab_size:
        raise ConfigError(f"top_k must be in [1, {teacher.vocab_size}] (the vocabulary), got {top_k}")
    stride = stride or max(1, seq_len // 2)
    if not 0 < stride <= seq_len:
        raise ConfigError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    out = Path(out_dir)
    meta = _cache_meta(teacher, source, split, len(tokens), top_k, seq_len, stride)
    done = _start_or_resume(out, meta, teacher)
    if done < meta["n_positions"]:
        _fill_cache(teacher, tokens, out, meta, done, batch_size, progress)
    meta["complete"] = True
    _write_json(out / CACHE_META, meta)
    return LogitCache(out)


def cache_teacher(
    teacher: str | os.PathLike,
    shards: str | os.PathLike,
    out_dir: str | os.PathLike,
    top_k: int = 64,
    seq_len: int | None = None,
    batch_size: int = 8,
    split: str = "train",
    device: str | torch.device | None = None,
    progress: bool = True,
    stride: int | None = None,
) -> LogitCache:
    """`flashlm distill cache`: load the teacher (FlashLM or local HF dir), check that it shares the shards'
    tokenizer, and build (or finish) its top-k cache over the shards' `split` (see `build_logit_cache`)."""
    from flashlm.data.shards import TokenShards
    from flashlm.tokenizer import Tokenizer

    model = load_teacher(teacher, device)
    if isinstance(model, CachedTeacher):
        raise ConfigError(f"{teacher} is already a logit cache; pass the teacher model's directory")
    shard_tok = Path(shards) / TOKENIZER_FILE
    if shard_tok.is_file():
        _check_student_vocab(model, vocab_of(shard_tok), str(teacher))
    elif model.tokenizer_file is not None:
        TokenShards(shards, split).check_tokenizer(Tokenizer.load(model.tokenizer_file))
    else:
        raise FlashLMError(
            f"cannot check that teacher {teacher} shares the tokenizer of {shards}: neither "
            "has a tokenizer.json; put the tokenizer next to the teacher's weights"
        )
    return build_logit_cache(model, shards, out_dir, top_k, seq_len, batch_size, split, progress, stride)


def _fill_cache(
    teacher: OnlineTeacher, tokens: np.ndarray, out: Path, meta: dict, done: int, batch_size: int, progress: bool
) -> None:
    n, k, seq_len, stride = meta["n_positions"], meta["top_k"], meta["seq_len"], meta["stride"]
    ids_mm = _open_array(out / CACHE_IDS, np.dtype(meta["ids_dtype"]), (n, k), "r+")
    lp_mm = _open_array(out / CACHE_LOGPROBS, np.dtype(meta["logprobs_dtype"]), (n, k), "r+")
    chunk = stride * batch_size
    with _progress_bar(progress, n, done) as advance:
        for start in range(done, n, chunk):
            stop = min(start + chunk, n)
            ids, logprobs = _teacher_topk(teacher, tokens, start, stop, seq_len, stride, k)
            ids_mm[start:stop], lp_mm[start:stop] = ids, logprobs
            ids_mm.flush()
            lp_mm.flush()
            _write_json(out / CACHE_PROGRESS, {"positions": stop})
            advance(stop - start)

"""Read documents from files or datasets, streaming (bounded memory, one document at a time).

Sources:
  * ``.jsonl`` (or ``.jsonl.gz``): one JSON object a line; the document is its ``field``.
  * ``.parquet``: the ``field`` column, read row group by row group (needs ``pyarrow``).
  * any other file is UTF-8 text, whatever its name (``.txt``, ``.md``, ``.tokens``, ``.raw``, none),
    gunzipped when it ends in ``.gz``: ``txt_mode="line"`` - one document per line; ``"blank"`` -
    documents separated by blank (whitespace-only) lines, the lines of a document joined with ``"\\n"``.
  * a directory: every file below it, recursively, in sorted path order (hidden files skipped).
  * any other iterable (a generator, a Hugging Face dataset): strings, or mappings holding ``field``.

A ``str`` or path-like is one path and a ``list``/``tuple`` is several paths; any other iterable is
taken as documents. Whitespace-only documents are skipped; the rest are yielded as they are (line
terminators removed). Bytes that are not valid UTF-8, or a NUL byte (binary data), raise `DataError`
naming the file and the byte offset (of the decompressed stream for ``.gz``): the data is not
silently altered.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from flashlm.errors import DataError

TXT_MODES = ("line", "blank")


def iter_documents(
    source: str | os.PathLike | list | tuple | Iterable[Any], txt_mode: str = "line", field: str = "text"
) -> Iterator[str]:
    """Yield the non-empty documents of ``source``; raise `DataError` if there are none.

    Paths are checked now (missing path, directory without matching files); reading is lazy.
    """
    if txt_mode not in TXT_MODES:
        raise DataError(f"txt_mode must be one of {', '.join(TXT_MODES)}, got {txt_mode!r}")
    if isinstance(source, (str, os.PathLike, list, tuple)):
        files = resolve_files(source)
        docs: Iterator[str] = (d for f in files for d in read_file(f, txt_mode, field))
        where = str(files[0]) if len(files) == 1 else f"{len(files)} files"
    else:
        docs, where = _from_iterable(source, field), "the given iterable"
    return _non_empty(docs, where)


def resolve_files(paths: str | os.PathLike | list | tuple) -> list[Path]:
    """Expand paths (files and directories) into the sorted list of readable corpus files."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise DataError("no input paths given")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
            if not found:
                raise DataError(f"no files in directory {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"no such file or directory: {_shown(item)}")
    return files


def _shown(item: str | os.PathLike) -> str:
    """A missing path for an error line; text passed where paths were expected gets a hint."""
    name = str(item)
    if "\n" in name or len(name) > 200:
        return f"{name[:60]!r}... (to pass texts rather than paths, pass an iterator of strings)"
    return name


def read_file(path: Path, txt_mode: str = "line", field: str = "text") -> Iterator[str]:
    """Yield the documents of one corpus file (empty ones included)."""
    kind = file_kind(path)
    if kind == "parquet":
        yield from _read_parquet(path, field)
        return
    try:
        with _open_binary(path) as fh:
            lines = _decoded_lines(fh, path)
            if kind == "jsonl":
                yield from _read_jsonl(lines, path, field)
            elif txt_mode == "blank":
                yield from _group_blank(lines)
            else:
                yield from (line.rstrip("\r\n") for _, line in lines)
    except (OSError, EOFError) as exc:  # unreadable file, bad or truncated gzip
        raise DataError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def file_kind(path: Path) -> str:
    """How a file is read: "parquet", "jsonl" (also gzipped) or "text" (any other name)."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl" if name.endswith(".jsonl") else "text"


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _decoded_lines(fh: IO[bytes], path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, text with its terminator), decoding strictly as UTF-8 (a BOM is dropped)."""
    offset = 0
    for number, raw in enumerate(fh, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            where = f"byte {offset + exc.start} (line {number})"
            raise DataError(f"{path}: invalid UTF-8 at {where}; re-encode the file as UTF-8") from None
        if "\x00" in text:
            where = f"byte {offset + raw.index(0)} (line {number})"
            raise DataError(f"{path}: binary data (a NUL byte at {where}); pass UTF-8 text, JSONL or Parquet")
        if number == 1 and text.startswith("\ufeff"):
            text = text[1:]
        offset += len(raw)
        yield number, text


def _group_blank(lines: Iterator[tuple[int, str]]) -> Iterator[str]:
    block: list[str] = []
    for _, line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\r\n")
            block = []
    if block:
        yield "".join(block).rstrip("\r\n")


def _read_jsonl(lines: Iterator[tuple[int, str]], path: Path, field: str) -> Iterator[str]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        yield _field(record, field, f"{path}:{number}")


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for group in range(pf.num_row_groups):
        for value in pf.read_row_group(group, columns=[field]).column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: column {field!r} holds {type(value).__name__}, not text")
            yield value or ""


def _from_iterable(items: Iterable[Any], field: str) -> Iterator[str]:
    for number, item in enumerate(items):
        yield item if isinstance(item, str) else _field(item, field, f"item {number}")


def _field(record: Any, field: str, where: str) -> str:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected text or an object with {field!r}, got {type(record).__name__}")
    if field not in record:
        raise DataError(f"{where}: no field {field!r} (fields: {', '.join(map(str, record))})")
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, not text")
    return value


def _non_empty(docs: Iterator[str], where: str) -> Iterator[str]:
    count = 0
    for doc in docs:
        if doc.strip():
            count += 1
            yield doc
    if count == 0:
        raise DataError(f"empty corpus: no non-empty documents in {where}")


__all__ = ["TXT_MODES", "file_kind", "iter_documents", "read_file", "resolve_files"]

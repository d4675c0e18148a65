"""Read documents from files or datasets, streaming (bounded memory, one document at a time).

Sources:
  * ``.jsonl`` (or ``.jsonl.gz``): one JSON object a line; the document is its ``field``.
  * ``.parquet``: the ``field`` column, read row group by row group (needs ``pyarrow``).
  * ``.arrow``: an Arrow IPC file (a Hugging Face ``datasets`` cache or ``save_to_disk`` file, stream or
    file format), memory-mapped and read record batch by record batch; the ``field`` column.
  * a Hugging Face ``datasets`` folder (``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``), read
    memory-mapped through `datasets.load_from_disk`; of a ``DatasetDict`` the ``split`` (default train).
  * `HubDataset`: ``datasets.load_dataset(name, config, split=..., data_files=..., streaming=True)``,
    a hub name or a builder such as ``json`` / ``text`` / ``parquet`` over local files. Without
    network it reads the local cache (offline mode), and fails on one line when the data is not there.
  * any other file is UTF-8 text, whatever its name (``.txt``, ``.md``, ``.tokens``, ``.raw``, none),
    gunzipped when it ends in ``.gz``: ``txt_mode="line"`` - one document per line; ``"blank"`` -
    documents separated by blank (whitespace-only) lines, the lines of a document joined with ``"\\n"``.
  * a directory: every file below it, recursively, in sorted path order (hidden files skipped); a
    ``datasets`` folder below it is read as one dataset.
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
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flashlm.errors import DataError, first_line

TXT_MODES = ("line", "blank")
# What marks a `datasets` save_to_disk folder (the names `datasets.load_from_disk` looks for).
DATASET_FILES, DATASET_DICT_FILE = ("state.json", "dataset_info.json"), "dataset_dict.json"
# `load_dataset` builders that read local files (never the Hub) when given data_files.
LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow", "pandas", "xml", "webdataset")
HUB_PROBE_SECONDS = 3.0  # how long to wait for the Hub's host before reading the cache offline


@dataclass(frozen=True)
class HubDataset:
    """A ``datasets.load_dataset`` source, streamed: a Hub name (``roneneldan/TinyStories``), a local
    loading script or folder, or a builder over files (``HubDataset("json", data_files=("a.jsonl",))``)."""

    name: str
    config: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] = ()


def iter_documents(
    source: str | os.PathLike | list | tuple | HubDataset | Iterable[Any],
    txt_mode: str = "line",
    field: str = "text",
    split: str = "train",
) -> Iterator[str]:
    """Yield the non-empty documents of ``source``; raise `DataError` if there are none.

    ``split`` picks the split of a ``DatasetDict`` folder. Paths are checked now (missing path,
    directory without matching files); reading is lazy.
    """
    if txt_mode not in TXT_MODES:
        raise DataError(f"txt_mode must be one of {', '.join(TXT_MODES)}, got {txt_mode!r}")
    if isinstance(source, HubDataset):
        docs: Iterator[str] = _read_hub(source, field)
        where = f"dataset {source.name!r} (split {source.split!r})"
    elif isinstance(source, (str, os.PathLike, list, tuple)):
        files = resolve_files(source)
        docs = (d for f in files for d in read_file(f, txt_mode, field, split))
        where = str(files[0]) if len(files) == 1 else f"{len(files)} files"
    else:
        docs, where = _from_iterable(source, field), "the given iterable"
    return _non_empty(docs, where)


def corpus_source(
    paths: list | tuple,
    dataset: str | None = None,
    config: str | None = None,
    data_files: list | tuple = (),
    split: str = "train",
    txt_mode: str = "line",
    field: str = "text",
) -> list[str] | HubDataset | Iterator[str]:
    """What the CLI's corpus options name, as something `iter_documents` reads: the paths themselves
    (so that readers of plain files can size a progress bar), a `HubDataset` for ``--dataset``, or the
    documents when ``split`` is not the default (it picks a ``DatasetDict`` folder's split)."""
    if dataset and paths:
        raise DataError("give input files or folders, or --dataset NAME, not both")
    if not dataset and (config or data_files):
        raise DataError("--config and --data-files go with --dataset NAME (e.g. --dataset json --data-files a.jsonl)")
    if not dataset and not paths:
        raise DataError("no input: give text / JSONL / Parquet / Arrow files or folders, or --dataset NAME")
    if dataset:
        return HubDataset(dataset, config or None, split, tuple(str(f) for f in data_files))
    if split == "train":
        return [str(p) for p in paths]
    return iter_documents([str(p) for p in paths], txt_mode, field, split)


def is_datasets_folder(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / DATASET_DICT_FILE).is_file() or all((path / n).is_file() for n in DATASET_FILES))


def resolve_files(paths: str | os.PathLike | list | tuple) -> list[Path]:
    """Expand paths (files and directories) into the sorted list of readable corpus files; a ``datasets``
    folder stays one entry (a directory)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise DataError("no input paths given")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if is_datasets_folder(path):
            files.append(path)
        elif path.is_dir():
            found = _walk(path)
            if not found:
                raise DataError(f"no files in directory {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"no such file or directory: {_shown(item)}")
    return files


def _walk(root: Path) -> list[Path]:
    """The files below `root` in sorted order, each ``datasets`` folder among them as one entry."""
    entries = sorted(p for p in root.rglob("*") if not _hidden(p.relative_to(root)))
    folders = [p for p in entries if is_datasets_folder(p)]
    found: list[Path] = []
    for p in entries:
        owner = next((f for f in folders if f == p or f in p.parents), None)
        if owner is not None:
            if owner not in found:
                found.append(owner)
        elif p.is_file():
            found.append(p)
    return found


def _shown(item: str | os.PathLike) -> str:
    """A missing path for an error line; text passed where paths were expected gets a hint."""
    name = str(item)
    if "\n" in name or len(name) > 200:
        return f"{name[:60]!r}... (to pass texts rather than paths, pass an iterator of strings)"
    return name


def read_file(path: Path, txt_mode: str = "line", field: str = "text", split: str = "train") -> Iterator[str]:
    """Yield the documents of one corpus file or ``datasets`` folder (empty ones included)."""
    if path.is_dir():
        yield from _read_saved_dataset(path, field, split)
        return
    kind = file_kind(path)
    if kind == "parquet":
        yield from _read_parquet(path, field)
        return
    if kind == "arrow":
        yield from _read_arrow(path, field)
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
    """How a file is read: "parquet", "arrow", "jsonl" (also gzipped) or "text" (any other name)."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if path.name.lower().endswith(".arrow"):
        return "arrow"
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


# ---- Hugging Face `datasets`: Arrow files, save_to_disk folders, load_dataset ---------------------------
def _read_arrow(path: Path, field: str) -> Iterator[str]:
    """The ``field`` column of an Arrow IPC file (``datasets`` writes the stream format; the file format
    is read too), memory-mapped, one record batch at a time."""
    import pyarrow as pa

    try:
        try:
            reader: Any = pa.ipc.open_stream(pa.memory_map(str(path)))
            batches: Iterable[Any] = reader
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Arrow file ({first_line(exc)})") from None
    names = reader.schema.names
    if field not in names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(names)}); choose one with --field")
    kind = reader.schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, not text; choose another with --field")
    for batch in batches:
        yield from (value or "" for value in batch.column(field).to_pylist())


def _read_saved_dataset(path: Path, field: str, split: str) -> Iterator[str]:
    """A ``save_to_disk`` folder through `datasets.load_from_disk` (memory-mapped); a ``DatasetDict``'s
    `split`."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # the library's own errors for a damaged folder vary (JSON, Arrow, OS)
        raise DataError(f"{path}: not a readable datasets folder ({first_line(exc)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)}); choose one with --split")
        ds = ds[split]
    if field not in ds.column_names:
        names = ", ".join(ds.column_names)
        raise DataError(f"{path}: no column {field!r} (columns: {names}); choose one with --field")
    feature = ds.features[field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{path}: column {field!r} holds {feature}, not text; choose another with --field")
    for batch in ds.select_columns([field]).iter(batch_size=1024):
        yield from (value or "" for value in batch[field])


def _read_hub(source: HubDataset, field: str) -> Iterator[str]:
    """Records of ``load_dataset(..., streaming=True)``: memory stays flat whatever the dataset's size.
    Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or the Hub's host not answering within
    `HUB_PROBE_SECONDS`) it reads the local cache only, so a missing network fails fast, not after retries."""
    import datasets

    local = source.name in LOCAL_BUILDERS or Path(source.name).exists()
    offline = _offline_requested() or (not local and not _hub_reachable())
    where = f"--dataset {source.name}"
    with _offline_mode(offline):
        try:
            ds = datasets.load_dataset(
                source.name,
                source.config,
                split=source.split,
                data_files=list(source.data_files) or None,
                streaming=True,
            )
            records = iter(ds)
        except Exception as exc:  # datasets raises many kinds (missing files, bad split, no network)
            hint = " (offline: not in the local Hugging Face cache)" if offline and not local else ""
            raise DataError(f"{where}: cannot load it{hint}: {first_line(exc)}") from None
        number = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as exc:  # a file that does not parse, a connection lost mid-stream
                raise DataError(f"{where}: reading record {number} failed: {first_line(exc)}") from None
            yield _field(record, field, f"{where} record {number}")
            number += 1


def _offline_requested() -> bool:
    return any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_reachable() -> bool:
    """Whether the Hub's host accepts a TCP connection within `HUB_PROBE_SECONDS` (name lookup included:
    it runs in a thread, since a lookup ignores socket timeouts)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_SECONDS).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_SECONDS)
    return bool(answered)


@contextmanager
def _offline_mode(offline: bool) -> Iterator[None]:
    """Offline mode for the libraries, which read HF_HUB_OFFLINE once at import: their flags are set for the
    duration (both are the documented switch; `datasets` copies the Hub's)."""
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


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


__all__ = [
    "TXT_MODES",
    "HubDataset",
    "corpus_source",
    "file_kind",
    "is_datasets_folder",
    "iter_documents",
    "read_file",
    "resolve_files",
]

"""Hugging Face `datasets` as corpus input, through the CLI: save_to_disk folders (Dataset and DatasetDict),
.arrow files and `--dataset NAME --data-files ... --split S` (load_dataset, streaming). Each gives the same
tokenizer and the same token shards as the same documents read from a .txt file; mistakes are one line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from corpora import stories
from typer.testing import CliRunner

from flashlm.cli import app
from flashlm.data.corpus import HubDataset, iter_documents
from flashlm.errors import DataError

SHARD_FILES = ("train.bin", "train.idx", "val.bin", "val.idx")


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The same 300 generated stories as a .txt file (one a line), a .jsonl file, a Dataset folder, a
    DatasetDict folder (other stories in train, these in validation), a folder holding a Dataset folder,
    and the Dataset's .arrow file."""
    root = tmp_path_factory.mktemp("datasets_input")
    docs = stories(300)
    assert all("\n" not in d for d in docs)
    (root / "corpus.txt").write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    data = datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs})
    data.save_to_disk(str(root / "folder"))
    other = datasets.Dataset.from_dict({"id": [0, 1], "text": stories(2, seed=5)})
    datasets.DatasetDict({"train": other, "validation": data}).save_to_disk(str(root / "dict"))
    data.save_to_disk(str(root / "parent" / "inner"))
    arrows = sorted((root / "folder").glob("*.arrow"))
    assert len(arrows) == 1
    return {
        "txt": root / "corpus.txt",
        "jsonl": root / "corpus.jsonl",
        "folder": root / "folder",
        "dict": root / "dict",
        "parent": root / "parent",
        "arrow": arrows[0],
    }


def cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def ok(*args: str) -> None:
    result = cli(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)


def inputs(corpus: dict[str, Path], kind: str) -> list[str]:
    """CLI words naming the same 300 documents in each supported way."""
    return {
        "folder": [corpus["folder"]],
        "dict": [corpus["dict"], "--split", "validation"],
        "parent": [corpus["parent"]],
        "arrow": [corpus["arrow"]],
        "json": ["--dataset", "json", "--data-files", corpus["jsonl"]],
        "text": ["--dataset", "text", "--data-files", corpus["txt"]],
    }[kind]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """Tokenizer and shards made from the .txt file."""
    out = tmp_path_factory.mktemp("reference")
    ok("tokenizer", "train", corpus["txt"], "--vocab-size", "320", "--out", out / "tok")
    ok("data", "prepare", corpus["txt"], "-t", out / "tok", "-o", out / "shards", "--val-fraction", "0.1")
    return out


@pytest.mark.parametrize("kind", ["folder", "dict", "parent", "arrow", "json", "text"])
def test_datasets_inputs_give_the_txt_files_tokens(kind, corpus, reference, tmp_path):
    ok("tokenizer", "train", *inputs(corpus, kind), "--vocab-size", "320", "--out", tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == (reference / "tok" / "tokenizer.json").read_text()
    tok = reference / "tok"
    ok("data", "prepare", *inputs(corpus, kind), "-t", tok, "-o", tmp_path / "shards", "--val-fraction", "0.1")
    for name in SHARD_FILES:
        assert (tmp_path / "shards" / name).read_bytes() == (reference / "shards" / name).read_bytes(), name
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["splits"] == json.loads((reference / "shards" / "meta.json").read_text())["splits"]
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 300


def test_default_split_is_train_and_arrow_file_format_reads(corpus, tmp_path):
    assert list(iter_documents(corpus["dict"])) == stories(2, seed=5)
    # An Arrow IPC *file* (pyarrow's own writer), besides the stream format datasets writes.
    import pyarrow as pa

    table = pa.table({"body": ["first document", "", "second document"]})
    path = tmp_path / "docs.arrow"
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    assert list(iter_documents(path, field="body")) == ["first document", "second document"]


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["{dict}", "--split", "test"], "no split 'test' (splits: train, validation); choose one with --split"),
        (["{folder}", "--field", "id"], "column 'id' holds Value('int64'), not text"),
        (["{arrow}", "--field", "body"], "no column 'body' (columns: id, text)"),
        (["{folder}", "--dataset", "json"], "give input files or folders, or --dataset NAME, not both"),
        (["--data-files", "{jsonl}"], "--config and --data-files go with --dataset NAME"),
        ([], "no input: give text / JSONL / Parquet / Arrow files or folders, or --dataset NAME"),
        (["--dataset", "json", "--data-files", "{missing}"], "--dataset json: cannot load it"),
        (["--dataset", "json", "--data-files", "{jsonl}", "--split", "val"], "--dataset json: cannot load it"),
        (["--dataset", "json", "--data-files", "{jsonl}", "--field", "body"], "no field 'body' (fields: text)"),
    ],
)
def test_mistakes_are_one_clear_data_error(words, expected, corpus, tmp_path):
    paths = {k: str(v) for k, v in corpus.items()} | {"missing": str(tmp_path / "missing.jsonl")}
    result = cli("tokenizer", "train", *(w.format(**paths) for w in words), "--out", tmp_path / "tok")
    assert isinstance(result.exception, DataError), result.output + repr(result.exception)
    assert expected in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "tok" / "tokenizer.json").exists()


@pytest.mark.parametrize("offline_env", [True, False])
def test_hub_name_without_network_or_cache_fails_fast_on_one_line(offline_env, tmp_path):
    """No cache (HF_HOME is empty) and, here, no network: one line and exit code 2 within seconds, not a
    traceback or minutes of retries. With HF_DATASETS_OFFLINE unset the Hub's host is probed first (with
    network, the Hub answers that the name does not exist: one line too)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env |= {"HF_HOME": str(tmp_path / "hf"), **({"HF_DATASETS_OFFLINE": "1"} if offline_env else {})}
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "flashlm", "tokenizer", "train", "--dataset", "flashlm-tests/no-such-dataset-3f2a"]
        + ["--out", str(tmp_path / "tok")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --dataset flashlm-tests/no-such-dataset-3f2a:"), lines
    assert "Traceback" not in proc.stdout + proc.stderr
    assert time.perf_counter() - began < 60
    assert not (tmp_path / "tok" / "tokenizer.json").exists()


def test_hub_dataset_streams(corpus, monkeypatch):
    """load_dataset is called with streaming=True: records arrive one at a time, nothing is materialised."""
    calls = {}
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    docs = iter_documents(HubDataset("json", data_files=(str(corpus["jsonl"]),)))
    assert next(docs) == stories(1)[0]
    assert calls["streaming"] is True
    with pytest.raises(DataError, match="split 'nope'"):
        list(iter_documents(corpus["dict"], split="nope"))


REPO = Path(__file__).resolve().parents[2]


def docs_block(marker: str, language: str) -> str:
    """The `language` code block between docs/elsewhere.md's ``<!-- marker:begin/end -->`` comments."""
    text = (REPO / "docs" / "elsewhere.md").read_text(encoding="utf-8")
    block = text.split(f"<!-- {marker}:begin -->")[1].split(f"<!-- {marker}:end -->")[0]
    return block.split(f"```{language}\n")[1].split("```")[0]


def test_docs_datasets_commands(tmp_path, monkeypatch):
    """docs/elsewhere.md's datasets block, as written, in a folder holding corpus.txt: every kind of input
    gives the shards of the .txt file, byte for byte."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("".join(d + "\n" for d in stories(200)), encoding="utf-8")
    exec(compile(docs_block("datasets", "python"), "docs/elsewhere.md", "exec"), {})
    commands = [shlex.split(line) for line in docs_block("datasets", "bash").splitlines() if line.strip()]
    assert len(commands) == 7 and all(words[0] == "flashlm" for words in commands)
    for words in commands:
        ok(*words[1:])
    outs = [words[words.index("--out") + 1] for words in commands[1:]]
    reference = tmp_path / "shards_txt"
    for out in outs:
        for name in SHARD_FILES:
            assert (tmp_path / out / name).read_bytes() == (reference / name).read_bytes(), (out, name)
    assert json.loads((reference / "meta.json").read_text())["splits"]["train"]["docs"] > 150

"""Corpus reading, token shards, the synthetic story corpus and the `tokenizer`/`data` CLI verbs."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from corpora import stories, write_stories

from flashlm.data.corpus import iter_documents, resolve_files
from flashlm.data.shards import SPLITS, TokenShards, dtype_for, prepare_shards, read_meta, val_mask
from flashlm.data.synthetic import story_corpus, write_story_corpus
from flashlm.errors import ConfigError, DataError
from flashlm.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, Tokenizer

REPO = Path(__file__).resolve().parents[2]


def split_docs(docs: list[str], val_fraction: float) -> dict[str, list[str]]:
    is_val = val_mask(np.arange(len(docs)), val_fraction).tolist()
    return {split: [d for d, v in zip(docs, is_val, strict=True) if v == (split == "val")] for split in SPLITS}


# ---- corpus -------------------------------------------------------------------------------------
def test_txt_line_mode_skips_blank_lines_and_strips_terminators(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffone doc\r\n\n   \ntwo  docs \nthree".encode())
    assert list(iter_documents(tmp_path / "a.txt")) == ["one doc", "two  docs ", "three"]


def test_txt_blank_mode_groups_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n\n\n  \nnext doc\n\nlast\n", encoding="utf-8")
    docs = list(iter_documents(str(tmp_path / "a.txt"), txt_mode="blank"))
    assert docs == ["first line\nsecond line", "next doc", "last"]


def test_jsonl_reads_the_chosen_field(tmp_path):
    rows = [{"text": "t1", "body": "b1"}, {"text": "t2", "body": None}, {"text": "t3", "body": "b3"}]
    (tmp_path / "a.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n", encoding="utf-8")
    assert list(iter_documents(tmp_path / "a.jsonl")) == ["t1", "t2", "t3"]
    assert list(iter_documents(tmp_path / "a.jsonl", field="body")) == ["b1", "b3"]
    with pytest.raises(DataError, match=r"a\.jsonl:1: no field 'missing'"):
        list(iter_documents(tmp_path / "a.jsonl", field="missing"))


def test_parquet_reads_a_column_row_group_by_row_group(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(range(10)), "content": [f"doc {i}" for i in range(10)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=3)
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups == 4
    assert list(iter_documents(tmp_path / "a.parquet", field="content")) == [f"doc {i}" for i in range(10)]
    with pytest.raises(DataError, match=r"no column 'text' \(columns: id, content\)"):
        list(iter_documents(tmp_path / "a.parquet"))


def test_directories_recurse_in_sorted_order_and_read_gzip(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from z\n", encoding="utf-8")
    (tmp_path / "b" / "a.jsonl").write_text('{"text": "from a"}\n', encoding="utf-8")
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("from gz\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ignored\n", encoding="utf-8")
    assert [p.name for p in resolve_files(tmp_path)] == ["a.jsonl", "z.txt", "c.txt.gz"]
    assert list(iter_documents(tmp_path)) == ["from a", "from z", "from gz"]


def test_iterables_of_strings_or_records_are_documents():
    assert list(iter_documents(iter(["a", "", "b"]))) == ["a", "b"]
    records = ({"text": t} for t in ["x", "y"])  # what iterating a Hugging Face dataset yields
    assert list(iter_documents(records)) == ["x", "y"]


def test_reading_is_lazy():
    def endless():
        yield from itertools.repeat("doc")

    assert list(itertools.islice(iter_documents(endless()), 3)) == ["doc"] * 3


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes("good line\nbad é ".encode() + b"\xff\xfe here\n")
    with pytest.raises(DataError) as err:
        list(iter_documents(tmp_path / "bad.txt"))
    assert str(err.value).startswith(f"{tmp_path / 'bad.txt'}: invalid UTF-8 at byte 17 (line 2)")


def test_text_files_of_any_name_are_read_as_utf8_text(tmp_path):
    names = ("wiki.valid.tokens", "notes.md", "corpus.raw", "README", "more.txt.gz", "captions.de.gz")
    for name in names:
        data = f"first {name}\nsecond line\n".encode()
        (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    for name in names:
        assert list(iter_documents(tmp_path / name)) == [f"first {name}", "second line"]
    assert len(list(iter_documents(tmp_path))) == 2 * len(names)  # a folder: every file in it


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.txt", "no such file or directory"),
        (lambda p: (p / "e.txt").write_text("\n  \n\n") and p / "e.txt", "empty corpus: no non-empty"),
        (lambda p: (p / "d").mkdir() or (p / "d" / ".hidden").write_text("a") and p / "d", "no files in directory"),
        (lambda p: (p / "x.bin").write_bytes(b"ab\ncd\x00e\n") and p / "x.bin", r"x\.bin: binary data .*byte 5"),
        (lambda p: (p / "j.jsonl").write_text("{oops\n") and p / "j.jsonl", r"j\.jsonl:1: invalid JSON"),
    ],
)
def test_bad_inputs_raise_one_line_data_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as err:
        list(iter_documents(make(tmp_path)))
    assert "\n" not in str(err.value)


def test_bad_txt_mode_and_empty_iterable():
    with pytest.raises(DataError, match="txt_mode must be one of line, blank"):
        iter_documents(iter(["a"]), txt_mode="para")
    with pytest.raises(DataError, match="empty corpus"):
        list(iter_documents(iter(["", " "])))
    with pytest.raises(DataError, match="pass an iterator of strings") as err:
        iter_documents("Once upon a time.\nThe end.")  # a text where a path belongs
    assert "\n" not in str(err.value)


# ---- shards -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def story_docs() -> list[str]:
    return stories(600)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, story_docs, trained_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("shards")
    prepare_shards(iter(story_docs), trained_tokenizer, out, val_fraction=0.05, workers=1, progress=False)
    return out


def test_shards_hold_exactly_the_documents_each_framed_by_bos_and_eos(shard_dir, story_docs, trained_tokenizer):
    for split, docs in split_docs(story_docs, 0.05).items():
        shards = TokenShards(shard_dir, split)
        expected = [trained_tokenizer.encode(d, add_bos=True, add_eos=True) for d in docs]
        assert shards.n_docs == len(docs)
        assert shards.tokens.tolist() == [t for ids in expected for t in ids]
        assert [shards.document(i).tolist() for i in range(shards.n_docs)] == expected
        assert trained_tokenizer.decode(shards.document(-1)) == docs[-1]
        assert shards.text_bytes == sum(len(d.encode("utf-8")) for d in docs)
        assert isinstance(shards.tokens, np.memmap) and isinstance(shards.doc_offsets, np.memmap)
        assert shards.tokens.dtype == np.uint16 and len(shards) == shards.doc_offsets[-1]
    with pytest.raises(IndexError):
        TokenShards(shard_dir).document(10_000)


def test_meta_records_counts_bytes_and_the_tokenizer(shard_dir, story_docs, trained_tokenizer):
    meta = read_meta(shard_dir)
    assert meta["version"] == 1 and meta["dtype"] == "uint16" and meta["eos_id"] == EOS_ID and meta["bos_id"] == BOS_ID
    assert meta["vocab_size"] == 512 and meta["tokenizer_fingerprint"] == trained_tokenizer.fingerprint
    splits = meta["splits"]
    assert splits["train"]["docs"] + splits["val"]["docs"] == len(story_docs)
    assert 0.03 * len(story_docs) <= splits["val"]["docs"] <= 0.07 * len(story_docs)
    files = sorted(p.name for p in shard_dir.iterdir())
    assert files == ["meta.json", "tokenizer.json", "train.bin", "train.idx", "val.bin", "val.idx"]
    assert Tokenizer.load(shard_dir).fingerprint == trained_tokenizer.fingerprint  # training finds it here


def test_a_process_pool_writes_identical_shards(tmp_path, shard_dir, story_docs, trained_tokenizer):
    src = tmp_path / "stories.txt"
    src.write_text("\n".join(story_docs) + "\n", encoding="utf-8")
    out = tmp_path / "pool"
    prepare_shards(src, trained_tokenizer, out, val_fraction=0.05, workers=2, chunk_docs=37, progress=False)
    for name in ("train.bin", "train.idx", "val.bin", "val.idx", "meta.json"):
        assert (out / name).read_bytes() == (shard_dir / name).read_bytes(), name


def test_val_split_edge_cases(tmp_path, trained_tokenizer):
    one = prepare_shards(iter(["only doc"]), trained_tokenizer, tmp_path / "one", progress=False)
    two = prepare_shards(iter(["first", "second"]), trained_tokenizer, tmp_path / "two", progress=False)
    none = prepare_shards(iter("abc"), trained_tokenizer, tmp_path / "none", val_fraction=0, progress=False)
    assert (one["splits"]["train"]["docs"], one["splits"]["val"]["docs"]) == (1, 0)
    assert (two["splits"]["train"]["docs"], two["splits"]["val"]["docs"]) == (1, 1)
    assert none["splits"]["val"]["docs"] == 0
    empty_val = TokenShards(tmp_path / "none", "val")
    assert len(empty_val) == 0 and empty_val.n_docs == 0
    assert val_mask(np.arange(100_000), 0.01).mean() == pytest.approx(0.01, abs=2e-4)
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare_shards(iter(["a"]), trained_tokenizer, tmp_path / "bad", val_fraction=1.0, progress=False)


def test_large_vocabularies_use_uint32(tmp_path):
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    names = [*SPECIAL_TOKENS, *sorted(alphabet), *(f"x{i}" for i in range(70_000)), "Ġc", "Ġca", "Ġcat"]
    merges = [("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t")]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(names)}, merges))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    tok = Tokenizer(backend)
    meta = prepare_shards(iter(["a cat", "the cat"]), tok, tmp_path, val_fraction=0, progress=False)
    shards = TokenShards(tmp_path)
    assert meta["dtype"] == "uint32" and shards.tokens.dtype == np.uint32
    assert shards.tokens.tolist() == tok.encode("a cat", True, True) + tok.encode("the cat", True, True)
    assert shards.tokens.max() == len(names) - 1 > 65535  # "Ġcat" really needs 32 bits


def test_check_tokenizer_rejects_a_different_tokenizer(shard_dir, trained_tokenizer):
    shards = TokenShards(shard_dir)
    shards.check_tokenizer(Tokenizer.from_str(trained_tokenizer.to_str()))
    other = Tokenizer.train(iter(["some other text entirely"] * 10), 300, show_progress=False)
    with pytest.raises(DataError) as err:
        shards.check_tokenizer(other)
    expected = (
        f"shards in {shard_dir} were made with tokenizer {trained_tokenizer.fingerprint[:8]} but "
        f"{other.fingerprint[:8]} was given; re-run flashlm data prepare with this tokenizer"
    )
    assert str(err.value) == expected


def test_damaged_shard_directories_raise_data_errors(tmp_path, shard_dir):
    with pytest.raises(DataError, match="no meta.json"):
        TokenShards(tmp_path)
    for name in ("meta.json", "train.bin", "train.idx"):
        (tmp_path / name).write_bytes((shard_dir / name).read_bytes())
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShards(tmp_path, "test")
    (tmp_path / "train.bin").write_bytes((shard_dir / "train.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train\.bin is \d+ bytes, expected"):
        TokenShards(tmp_path)
    (tmp_path / "meta.json").write_text('{"format": "flashlm-token-shards", "splits": ', encoding="utf-8")
    with pytest.raises(DataError, match="is garbled"):
        TokenShards(tmp_path)


def test_a_failed_run_leaves_no_partial_files(tmp_path, trained_tokenizer):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("good doc\n" * 50, encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_bytes(b"fine\n\xc3 broken\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"b\.txt: invalid UTF-8 at byte 5"):
        prepare_shards(tmp_path / "in", trained_tokenizer, out, chunk_docs=8, progress=False)
    assert list(out.iterdir()) == []


def test_preparing_again_replaces_the_shards(tmp_path, trained_tokenizer):
    prepare_shards(iter(["one", "two", "three"]), trained_tokenizer, tmp_path, progress=False)
    meta = prepare_shards(iter(["four", "five"]), trained_tokenizer, tmp_path, progress=True)
    shards = TokenShards(tmp_path, "train")
    assert meta["splits"]["train"]["docs"] == 1 and trained_tokenizer.decode(shards.tokens) == "four"
    assert not list(tmp_path.glob(".*.tmp"))


# ---- synthetic stories --------------------------------------------------------------------------
def test_story_corpus_is_deterministic_and_varied():
    a, b, c = (list(story_corpus(300, seed=s)) for s in (1, 1, 2))
    assert a == b and a != c
    assert len(set(a)) == 300
    sentences = [len(re.findall(r"[.!?](?:\"|$| )", s)) for s in a]
    assert min(sentences) >= 5 and max(sentences) >= 2 * min(sentences)
    assert all("\n" not in s for s in a)


def test_stories_keep_their_referents():
    for story in story_corpus(200, seed=3):
        hero = re.search(r"named (\w+)\.|^(\w+) was a|called (\w+),", story)
        assert hero, story
        name = next(g for g in hero.groups() if g)
        assert story.count(name) >= 3, story
        obj = re.search(r"(?:found an?|had an?|thing was an?) (\w+ (?:teddy )?\w+)(?:\.| that| from)", story)
        if obj:  # the story's object, introduced once, comes back by its noun
            noun = obj.group(1).split(" ", 1)[1]
            assert story.count(noun) >= 2, story


def test_the_story_world_is_varied():
    stories = list(story_corpus(2000, seed=0))
    words = {w.lower() for s in stories for w in re.findall(r"[A-Za-z']+", s)}
    assert len(words) > 500  # names, places, objects, feelings, plots
    assert sum('"' in s for s in stories) > 0.8 * len(stories)  # most stories have dialogue
    openings = {" ".join(s.split()[:2]) for s in stories}
    assert len(openings) > 20


def test_write_story_corpus_is_readable_line_by_line(tmp_path):
    path = write_story_corpus(tmp_path / "demo" / "stories.txt", 500, seed=0)
    assert list(iter_documents(path)) == list(story_corpus(500, seed=0))
    assert 150_000 < path.stat().st_size < 600_000


# ---- command line -------------------------------------------------------------------------------
def flashlm(*args: object) -> subprocess.Popen:
    """Start `python -m flashlm ARGS` (the same entry point as the `flashlm` console script)."""
    cmd = [sys.executable, "-m", "flashlm", *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_trains_a_tokenizer_and_prepares_shards(tmp_path, story_docs):
    src = tmp_path / "stories.txt"
    src.write_text("\n".join(story_docs[:300]), encoding="utf-8")
    tok, shards = tmp_path / "tok", tmp_path / "sh"
    out, err = flashlm("tokenizer", "train", src, "--vocab-size", 300, "--out", tok).communicate()
    assert "tokenizer with 300 tokens" in out, err
    args = ("--tokenizer", tok, "--out", shards, "--workers", 1, "--val-fraction", 0.1)
    out, err = flashlm("data", "prepare", src, *args).communicate()
    assert "train: 270 documents" in out and "val: 30 documents" in out, err
    reader = TokenShards(shards)
    reader.check_tokenizer(Tokenizer.load(tok))
    assert Tokenizer.load(tok).decode(reader.document(0)) == story_docs[0]


@pytest.fixture(scope="module")
def cli_failures(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """Every bad-input case run at once (in parallel) as a real subprocess."""
    d = tmp_path_factory.mktemp("cli")
    (d / "blank.txt").write_text("\n \n", encoding="utf-8")
    (d / "nothing").mkdir()
    (d / "bad.txt").write_bytes(b"ok\n\x80\n")
    tok = write_stories(d / "stories.txt", 300)
    Tokenizer.train(tok, 300, show_progress=False).save(d / "tok")

    # Each case has its own --out folder: the processes run at once, and the writability probe
    # removes a folder it made, which would race with another process probing the same one.
    def prep(out: str) -> tuple:
        return ("data", "prepare", "--tokenizer", d / "tok", "--out", d / out)

    cases = {
        "tokenizer input missing": ("tokenizer", "train", d / "nope.txt", "--out", d / "t1"),
        "vocab too small": ("tokenizer", "train", tok, "--vocab-size", 100, "--out", d / "t2"),
        "data input missing": (*prep("o1"), d / "nope.txt"),
        "empty corpus": (*prep("o2"), d / "blank.txt"),
        "no matching files": (*prep("o3"), d / "nothing"),
        "undecodable bytes": (*prep("o4"), d / "bad.txt"),
        "tokenizer missing": ("data", "prepare", tok, "--tokenizer", d / "none", "--out", d / "o5"),
        "bad txt mode": (*prep("o6"), tok, "--txt-mode", "para"),
    }
    procs = {name: flashlm(*args) for name, args in cases.items()}
    return {name: (p.wait(), *p.communicate()) for name, p in procs.items()}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tokenizer input missing", "no such file or directory: .*nope.txt"),
        ("vocab too small", "vocab_size must be at least 261"),
        ("data input missing", "no such file or directory: .*nope.txt"),
        ("empty corpus", "empty corpus: no non-empty documents in .*blank.txt"),
        ("no matching files", "no files in directory .*nothing"),
        ("undecodable bytes", r".*bad.txt: invalid UTF-8 at byte 3 \(line 2\)"),
        ("tokenizer missing", "no tokenizer at .*none"),
        ("bad txt mode", "txt_mode must be one of line, blank"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(cli_failures, case, message):
    code, out, err = cli_failures[case]
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(f"^error: {message}", err.strip()), err

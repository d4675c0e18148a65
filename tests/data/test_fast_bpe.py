"""tiktoken over a trained FlashLM BPE gives exactly `tokenizers`' ids, or is not offered."""

from __future__ import annotations

import gzip
import json

import pytest
from corpora import real_data, stories

from flashlm.data.fast_bpe import tiktoken_batch_encoder, tiktoken_encoding
from flashlm.tokenizer import Tokenizer

pytest.importorskip("tiktoken", reason="tiktoken is a dependency; this checks the fast path it enables")

TRICKY = [
    "Größe, Straße und Übermut — naïve café.",
    "日本語のテキスト、中文文本，한국어 텍스트.",
    "emoji 🙂👩‍👩‍👧 and combining e\u0301 and \u200b zero width",
    "tabs\tand   spaces\r\nwindows line\n\n\nparagraphs  ",
    "<pad><bos><eos><mask><sep> and <eos in the middle>",
    "it's they're we've I'm you'll he'd 'quoted' 1234567 3.14159 x=y+z;",
    "",
]


def _tokenizers_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.backend.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def story_tokenizer() -> Tokenizer:
    return Tokenizer.train(iter(stories(300, seed=3) + TRICKY * 3), vocab_size=700, show_progress=False)


def test_tiktoken_ids_equal_tokenizers_ids_on_generated_and_tricky_text(story_tokenizer):
    encode = tiktoken_batch_encoder(story_tokenizer.to_str())
    assert encode is not None
    texts = stories(200, seed=11) + TRICKY
    assert encode(texts) == _tokenizers_ids(story_tokenizer, texts)


def test_tiktoken_ids_equal_tokenizers_ids_on_real_text():
    shakespeare = real_data("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    with gzip.open(real_data("multi30k/train.de.gz"), "rt", encoding="utf-8") as fh:
        german = fh.read(200_000)
    tok = Tokenizer.train(iter([shakespeare[:400_000], german[:100_000]]), vocab_size=2048, show_progress=False)
    encode = tiktoken_batch_encoder(tok.to_str())
    held_out = [shakespeare[400_000:], german[100_000:]]  # text the merges were not learnt from
    assert encode(held_out) == _tokenizers_ids(tok, held_out)


def test_other_tokenizer_shapes_are_not_offered(story_tokenizer):
    spec = json.loads(story_tokenizer.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    assert tiktoken_encoding(json.dumps(spec)) is None
    spec = json.loads(story_tokenizer.to_str())
    spec["normalizer"] = {"type": "NFC"}
    assert tiktoken_encoding(json.dumps(spec)) is None
    spec = json.loads(story_tokenizer.to_str())
    spec["model"]["merges"] = list(reversed(spec["model"]["merges"]))  # merges no longer in id order
    assert tiktoken_encoding(json.dumps(spec)) is None


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_with_tiktoken_writes_the_same_shards(story_tokenizer, tmp_path, workers):
    from flashlm.data.shards import prepare_shards

    docs = stories(400, seed=21) + TRICKY[:-1]
    metas = {}
    for encoder in ("tokenizers", "auto"):
        out = tmp_path / f"{encoder}-{workers}"
        metas[encoder] = prepare_shards(
            iter(docs),
            story_tokenizer,
            out,
            val_fraction=0.05,
            workers=workers,
            chunk_docs=64,
            progress=False,
            encoder=encoder,
        )
    assert metas["auto"]["encoder"] == "tiktoken"  # auto checked the first chunk and took the fast path
    assert metas["tokenizers"]["encoder"] == "tokenizers"
    for split in ("train", "val"):
        for suffix in (".bin", ".idx"):
            a = (tmp_path / f"tokenizers-{workers}" / f"{split}{suffix}").read_bytes()
            assert a == (tmp_path / f"auto-{workers}" / f"{split}{suffix}").read_bytes()


def test_an_unknown_or_impossible_encoder_is_one_clear_error(story_tokenizer, tmp_path):
    from flashlm.data.shards import prepare_shards
    from flashlm.errors import ConfigError

    with pytest.raises(ConfigError, match="encoder must be one of"):
        prepare_shards(iter(["a b", "c d"]), story_tokenizer, tmp_path / "x", progress=False, encoder="fast")
    assert not (tmp_path / "x").exists()  # refused before any file is made
    spec = json.loads(story_tokenizer.to_str())
    spec["normalizer"] = {"type": "NFC"}
    with pytest.raises(ConfigError, match="cannot express this tokenizer"):
        prepare_shards(
            iter(["a b", "c d"]),
            Tokenizer.from_str(json.dumps(spec)),
            tmp_path / "y",
            progress=False,
            encoder="tiktoken",
        )

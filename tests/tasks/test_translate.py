"""Translation: Multi30k end to end (beam search itself: tests/test_beam_search.py)."""

from __future__ import annotations

from pathlib import Path

from corpora import real_data

from flashlm.config import ModelConfig
from flashlm.tasks.translate import TranslateConfig, read_pairs, run_translation
from flashlm.training.finetune import FinetuneConfig


def multi30k() -> Path:
    """The real Multi30k folder (the tests that need it skip without ../shared/data)."""
    return real_data("multi30k")


def test_translation_end_to_end_on_50_pairs():
    pairs = read_pairs(multi30k() / "train.en.gz", multi30k() / "train.de.gz", 50)
    assert len(pairs) == 50 and all(src and tgt for src, tgt in pairs)
    model = ModelConfig(
        vocab_size=512,
        d_model=32,
        n_layers=2,
        n_heads=2,
        n_kv_heads=2,
        d_ff=64,
        layer_pattern="G",
        max_seq_len=96,
    )
    cfg = TranslateConfig(
        vocab_size=400,
        model=model,
        beam=2,
        max_new_tokens=12,
        eval_limit=8,
        finetune=FinetuneConfig(max_steps=4, batch_size=16, progress=False),
        train_limit=50,
    )
    results = run_translation(
        multi30k() / "train.en.gz",
        multi30k() / "train.de.gz",
        multi30k() / "val.en.gz",
        multi30k() / "val.de.gz",
        cfg,
    )
    assert 0.0 <= results["bleu"] <= 100.0 and 0.0 < results["chrf"] <= 100.0
    assert results["train_pairs"] == 50 and results["eval_pairs"] == 8
    assert len(results["samples"]) == 5 and isinstance(results["samples"][0]["hypothesis"], str)

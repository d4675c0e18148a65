"""Shared helpers for the training tests: small token shards and tiny run configs."""

from __future__ import annotations

import itertools
from pathlib import Path

from flashlm.config import RunConfig, apply_overrides


def build_shards(directory: Path, n_docs: int = 1500, vocab_size: int = 512, source: Path | None = None) -> Path:
    """Tokenizer (byte-level BPE, `vocab_size`) + token shards of `n_docs` documents: generated stories,
    or the first lines of `source` (one document a line)."""
    from corpora import stories

    from flashlm.data.shards import prepare_shards
    from flashlm.tokenizer import Tokenizer

    if (directory / "meta.json").is_file():
        return directory
    if source is None:
        docs = stories(n_docs)
    else:
        with open(source, encoding="utf-8") as f:
            docs = [line.strip() for line in itertools.islice(f, n_docs) if line.strip()]
    tok = Tokenizer.train(iter(docs), vocab_size=vocab_size, show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(directory)
    prepare_shards(iter(docs), tok, directory, val_fraction=0.05, workers=1, progress=False)
    return directory


def tiny_config(data: Path, out: Path, *overrides: str) -> RunConfig:
    """The nano model at seq 32 on `data`, CPU, logging every step; `overrides` as section.key=value."""
    base = {
        "model": {"preset": "nano"},
        "train": {
            "data": str(data),
            "out": str(out),
            "steps": 6,
            "batch_size": 4,
            "seq_len": 32,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "eval_every": 3,
            "eval_batches": 2,
            "save_every": 3,
            "keep_last": 2,
            "device": "cpu",
            "precision": "fp32",
            "seed": 7,
        },
    }
    return RunConfig.from_dict(apply_overrides(base, list(overrides)))

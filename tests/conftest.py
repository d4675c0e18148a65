"""Shared fixtures. Real corpora live in ../shared/data next to the clone (the same layout in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only folder of real public corpora (never copied into the repo)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def trained_tokenizer():
    """A 512-token byte-level BPE trained on the TinyStories train head."""
    from flashlm.tokenizer import Tokenizer

    stories = SHARED_DATA / "tinystories" / "tinystories_train_head.txt"
    return Tokenizer.train(stories, 512, show_progress=False)

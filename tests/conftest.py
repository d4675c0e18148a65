"""Shared fixtures. Real corpora live in ../shared/data next to the clone (the same layout in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite trains many tiny models, and several tests start subprocesses (CLI runs, torchrun with two
# ranks): one intra-op thread per process avoids oversubscribing the cores and is faster for tiny models.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def pytest_configure(config) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

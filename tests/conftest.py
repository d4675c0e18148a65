"""Shared fixtures: generated text for the core of the suite, ../shared/data only through `real_data`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite trains many tiny models, and several tests start subprocesses (CLI runs, torchrun with two
# ranks): one intra-op thread per process avoids oversubscribing the cores and is faster for tiny models.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def trained_tokenizer():
    """A 512-token byte-level BPE trained on generated stories."""
    from corpora import stories

    from flashlm.tokenizer import Tokenizer

    return Tokenizer.train(iter(stories(2000)), 512, show_progress=False)


@pytest.fixture(scope="session")
def tinystories() -> Path:
    """The TinyStories train head (real text); skips the test where ../shared/data is absent."""
    from corpora import real_data

    return real_data("tinystories/tinystories_train_head.txt")


def pytest_configure(config) -> None:
    import torch

    from flashlm import hardware

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # The suite's numeric checks are stated in fp32, so `precision: auto` must not pick bf16 on a machine
    # with native bf16 units (tests/test_hardware.py mocks the detection both ways). Runs in subprocesses
    # set fp32 in their configs.
    hardware.cpu_bf16_support = lambda: {"amx": False, "avx512_bf16": False}

"""What the serving tests share: the tiny model they all serve."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def save_tiny_model():
    """``save(folder, **config_changes)``: a nano model (random weights, embeddings x4 so greedy paths are
    not ties) with a 512-token BPE trained on generated stories, saved in `folder`; returns its path."""
    import torch
    from corpora import stories

    from flashlm.config import get_preset, replace
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    def save(folder: Path, **changes) -> Path:
        tokenizer = Tokenizer.train(iter(stories(300)), 512, show_progress=False)
        torch.manual_seed(0)
        model = FlashLM(replace(get_preset("nano"), **changes)).eval()
        with torch.no_grad():
            model.embed.weight.mul_(4.0)
        return model.save_pretrained(folder, tokenizer=tokenizer)

    return save

"""Every file FlashLM writes for a model (model.safetensors included, which safetensors itself would leave
0600) gets the mode the process umask gives any new file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from train_utils import build_shards, tiny_config

from flashlm.config import get_preset
from flashlm.interop.hf import export_hf
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import Tokenizer
from flashlm.training import train


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def test_saved_and_exported_models_use_the_umask_mode(umask, tmp_path, trained_tokenizer: Tokenizer):
    model = FlashLM(get_preset("nano"))
    model.save_pretrained(tmp_path / "model", trained_tokenizer)
    export_hf(model, tmp_path / "hf", trained_tokenizer)
    for folder in ("model", "hf"):
        found = modes(tmp_path / folder)
        assert "model.safetensors" in found
        assert found == dict.fromkeys(found, 0o666 & ~umask), folder


def test_checkpoint_files_use_the_umask_mode(umask, tmp_path):
    shards = build_shards(tmp_path / "shards", n_docs=300)
    train(tiny_config(shards, tmp_path / "run", "train.steps=2", "train.save_every=2"))
    found = modes(tmp_path / "run" / "checkpoints")
    assert {Path(name).name for name in found} >= {"model.safetensors", "config.json", "train_state.pt"}
    assert found == dict.fromkeys(found, 0o666 & ~umask)

"""The small public API: `from flashlm import FlashLM, ModelConfig, Tokenizer, generate, train`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import flashlm


def test_import_flashlm_does_not_load_torch():
    code = "import sys, flashlm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_api_names_are_the_library_objects():
    from flashlm import FlashLM, ModelConfig, RunConfig, Sampling, Tokenizer, generate, train
    from flashlm.config import ModelConfig as config_model
    from flashlm.generation import generate as generation_generate
    from flashlm.model.transformer import FlashLM as model_class
    from flashlm.tokenizer import Tokenizer as tokenizer_class
    from flashlm.training.loop import train as loop_train

    assert (FlashLM, ModelConfig, Tokenizer, generate) == (
        model_class,
        config_model,
        tokenizer_class,
        generation_generate,
    )
    assert callable(train) and train.__module__.startswith("flashlm.training")
    assert loop_train is not None and RunConfig is not None and Sampling is not None
    assert set(flashlm.__all__) <= set(dir(flashlm))


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        flashlm.nothing  # noqa: B018


def test_build_and_generate_through_the_api(trained_tokenizer):
    from flashlm import FlashLM, ModelConfig, Sampling, generate

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=trained_tokenizer.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        d_ff=64,
        max_seq_len=64,
        sliding_window=16,
    )
    model = FlashLM(cfg).eval()
    text = generate(model, trained_tokenizer, "Once upon a time", Sampling(max_new_tokens=5, temperature=0))
    assert isinstance(text, str)
    assert text == generate(model, trained_tokenizer, "Once upon a time", Sampling(max_new_tokens=5, temperature=0))

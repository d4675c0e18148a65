"""The memory plan: sharding arithmetic, activation scaling and the CLI."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flashlm.cli import app
from flashlm.config import count_parameters, get_preset, layer_parameters
from flashlm.errors import ConfigError
from flashlm.model.transformer import FlashLM
from flashlm.training.memory import memory_plan


def test_layer_parameters_match_the_module():
    cfg = get_preset("micro")
    assert layer_parameters(cfg) == sum(p.numel() for p in FlashLM(cfg).layers[0].parameters())


def test_fsdp_shards_weights_gradients_and_adam_ddp_does_not():
    cfg = get_preset("7.5b")
    n = count_parameters(cfg)
    fsdp, ddp = memory_plan(cfg, gpus=8, seq_len=4096), memory_plan(cfg, gpus=8, seq_len=4096, strategy="ddp")
    static = ("weights", "gradients", "optimizer")
    assert sum(fsdp["bytes"][k] for k in static) == pytest.approx(16 * n / 8, abs=8)
    assert sum(ddp["bytes"][k] for k in static) == 16 * n
    assert fsdp["bytes"]["activations"] == ddp["bytes"]["activations"]  # per-GPU tokens are the same
    assert fsdp["bytes"]["fsdp_working_set"] > 0 == ddp["bytes"]["fsdp_working_set"]


def test_activations_grow_with_tokens_and_shrink_with_checkpointing():
    cfg = get_preset("1b")
    one, two = memory_plan(cfg, batch_size=1, seq_len=2048), memory_plan(cfg, batch_size=2, seq_len=2048)
    assert two["bytes"]["activations"] == 2 * one["bytes"]["activations"]
    assert two["bytes"]["logits"] == 2 * one["bytes"]["logits"] == 2 * 2048 * cfg.vocab_size * 10
    saved = memory_plan(cfg, batch_size=2, seq_len=2048, activation_checkpointing=True)
    assert saved["bytes"]["activations"] < two["bytes"]["activations"] / 4
    with pytest.raises(ConfigError):
        memory_plan(cfg, gpus=0)


def test_plan_cli_prints_the_plan_and_rejects_bad_input():
    runner = CliRunner()
    result = runner.invoke(
        app, ["plan", "--preset", "7.5b", "--gpus", "8", "--seq-len", "4096", "--checkpointing", "--gpu-memory", "80"]
    )
    assert result.exit_code == 0, result.output
    assert "7,505,195,008 parameters" in result.output and "fits in 80 GiB" in result.output
    assert runner.invoke(app, ["plan"]).exit_code != 0
    assert runner.invoke(app, ["plan", "--preset", "tiny", "--strategy", "zero"]).exit_code != 0

"""Precision chosen by the hardware (detection mocked both ways) and the machine record of every result."""

from __future__ import annotations

import pytest
import torch

from flashlm import hardware
from flashlm.training.finetune import FinetuneConfig
from flashlm.training.optim import autocast_for


@pytest.fixture(params=[False, True], ids=["avx2-only", "native-bf16"])
def native(request, monkeypatch):
    """A CPU with (True: AMX) or without (False) native bf16, as torch would report it."""
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: {"amx": request.param, "avx512_bf16": False})
    monkeypatch.setattr(hardware, "_warned", set())
    return request.param


def test_auto_picks_bf16_only_where_it_is_native(native):
    assert hardware.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert hardware.resolve_precision("auto", "cuda") == "bf16"
    assert hardware.resolve_precision("fp32", "cuda") == "fp32" and hardware.resolve_precision("fp32", "cpu") == "fp32"


def test_forcing_bf16_without_native_units_warns_once(native, capsys):
    assert hardware.resolve_precision("bf16", "cpu") == "bf16"
    assert hardware.resolve_precision("bf16", "cpu") == "bf16"
    err = capsys.readouterr().err
    if native:
        assert err == ""
    else:
        assert err.count("\n") == 1 and "much slower than fp32" in err and "--precision auto" in err


def test_training_autocasts_as_the_hardware_allows(native):
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with autocast_for("auto", torch.device("cpu"))():
        assert (a @ b).dtype == (torch.bfloat16 if native else torch.float32)
    with autocast_for("fp32", torch.device("cpu"))():
        assert (a @ b).dtype == torch.float32


def test_the_serving_engine_loads_bf16_weights_only_on_native_hardware(native, tmp_path, trained_tokenizer):
    from flashlm.config import get_preset, replace
    from flashlm.model.transformer import FlashLM
    from flashlm.serve.engine import Engine

    run = tmp_path / "run"
    FlashLM(replace(get_preset("nano"), vocab_size=trained_tokenizer.vocab_size)).save_pretrained(
        run / "checkpoints" / "step_000001", tokenizer=trained_tokenizer
    )
    (run / "latest").symlink_to("checkpoints/step_000001")
    engine = Engine.load(run / "latest")
    assert next(engine.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    assert engine.name == "run"  # a run's latest link is named after the run


def test_auto_is_the_default_and_unknown_values_are_refused():
    from flashlm.config import TrainConfig

    assert TrainConfig().precision == "auto" and FinetuneConfig().precision == "auto"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        hardware.resolve_precision("fp16", "cpu")


def test_machine_info_names_the_cpu_its_bf16_support_and_threads():
    info = hardware.machine_info()
    keys = {"cpu", "cpus", "torch_threads", "cpu_capability", "cpu_native_bf16", "cpu_amx", "cpu_avx512_bf16"}
    assert keys <= set(info)
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    line = hardware.describe(info)
    assert info["cpu"] in line and "torch threads" in line and "bf16" in line

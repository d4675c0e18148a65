"""The training loop (flashlm.training.loop): exact resume, outputs, schedules, switches, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_utils import build_shards, tiny_config
from typer.testing import CliRunner

from flashlm.cli import app
from flashlm.config import TrainConfig, get_preset
from flashlm.errors import ConfigError, DataError
from flashlm.model.flops import training_flops_per_token
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import Tokenizer
from flashlm.training import train as train_entry
from flashlm.training.checkpoint import latest_checkpoint, list_checkpoints
from flashlm.training.loop import train
from flashlm.training.muon import Muon
from flashlm.training.objectives import Objective, clm_loss, get_objective
from flashlm.training.optim import WARMUP_CLOCK_SHARE, build_optimizer, cosine, lr_factor, param_groups
from flashlm.training.runlog import read_metrics


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.getbasetemp() / "clm_shards")


def losses(summary: dict) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("grad_norm")) for r in summary["history"]]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_exact_resume_is_bit_identical(shards, tmp_path, optimizer):
    opt = f"train.optimizer={optimizer}"
    whole = train(tiny_config(shards, tmp_path / "whole", opt))
    first = train(tiny_config(shards, tmp_path / "split", opt), callback=lambda step, row: step == 3)
    assert first["step"] == 3 and first["checkpoint"].endswith("step_000003")
    second = train(tiny_config(shards, tmp_path / "split", opt, "train.resume=true"))
    assert second["resumed_from"].endswith("step_000003")
    assert losses(first) + losses(second) == losses(whole)  # exact float equality, every step
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [row["step"] for row in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_loss_decreases_on_real_text(shards, tmp_path):
    cfg = tiny_config(
        shards,
        tmp_path,
        "train.steps=30",
        "train.batch_size=8",
        "train.eval_every=15",
        "train.save_every=100",
        "train.warmup_steps=5",
    )
    summary = train_entry(cfg)  # the public entry point, flashlm.training.train
    train_losses = [r["loss"] for r in summary["history"] if "loss" in r]
    evals = [r["val_loss"] for r in summary["history"] if "val_loss" in r]
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5 - 0.5
    assert evals[-1] < evals[0] < math.log(512) + 0.5


def test_run_folder_holds_metrics_plot_and_checkpoints(shards, tmp_path):
    summary = train(tiny_config(shards, tmp_path, "train.steps=7", "train.log_every=2", "train.save_every=2"))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 7]  # log steps, eval steps (3, 6) and the last
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "clm_acc"} <= set(rows[0])
    assert {"val_loss", "val_ppl", "val_bpb"} <= set(rows[1]) and "loss" not in rows[1]
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "config.yaml").is_file()
    kept = [step for step, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert kept == [6, 7] and summary["checkpoint"].endswith("step_000007")
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert (ckpt / "tokenizer.json").is_file()  # found beside the shards, copied into every checkpoint
    assert (tmp_path / "latest").resolve() == ckpt.resolve()  # the run's stable name for its newest model
    model = FlashLM.from_pretrained(tmp_path / "latest")
    assert model.cfg == get_preset("nano")


def test_training_rows_and_the_progress_line_carry_mfu(shards, tmp_path, capfd):
    summary = train(tiny_config(shards, tmp_path, "train.steps=4", "train.log_every=2"))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2
    flops = training_flops_per_token(get_preset("nano"), 32)
    assert summary["flops_per_token"] == flops and "measured" in summary["peak_flops_source"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1.5
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * flops / summary["peak_flops"])
    err = capfd.readouterr().err
    assert "MFU against" in err and f"MFU {rows[-1]['mfu']:.1%}" in err
    # a given peak replaces the measurement
    given = train(tiny_config(shards, tmp_path / "given", "train.steps=2", "train.peak_flops=1e12"))
    assert given["peak_flops"] == 1e12 and given["peak_flops_source"] == "train.peak_flops"
    row = [r for r in given["history"] if "loss" in r][-1]
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] * flops / 1e12)


def test_a_timed_run_ends_on_the_clock_with_a_decayed_lr_and_a_checkpoint(shards, tmp_path):
    cfg = tiny_config(
        shards,
        tmp_path,
        "train.minutes=0.03",
        "train.steps=1000000",
        "train.log_every=100000",
        "train.eval_every=100000",
        "train.save_every=100000",
    )
    summary = train(cfg)
    assert 10 < summary["step"] < 1000000  # stopped by the clock, not the step cap
    last = summary["history"][-1]
    assert last["step"] == summary["step"] and "val_loss" in last  # the last step is logged and evaluated
    row = [r for r in summary["history"] if "lr" in r][-1]
    assert row["lr"] < 0.15 * cfg.train.lr  # the cosine ran to its floor (0.1 x peak) with the clock
    assert summary["checkpoint"].endswith(f"step_{summary['step']:06d}")
    assert (tmp_path / "latest").resolve() == Path(summary["checkpoint"]).resolve()
    state = torch.load(tmp_path / "latest" / "train_state.pt", weights_only=True)
    assert 0.03 * 60 <= state["train_seconds"] < 0.03 * 60 + 30


def test_the_lr_follows_the_clock_when_it_is_ahead_of_the_steps():
    cos = TrainConfig(steps=1000, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_factor(100, cos, clock=0.0) == lr_factor(100, cos)
    assert lr_factor(100, cos, clock=0.5) == pytest.approx(0.55) and lr_factor(100, cos, clock=1.0) == 0.1
    assert lr_factor(900, cos, clock=0.1) == lr_factor(900, cos)  # steps further along: steps win
    # warmup ends by WARMUP_CLOCK_SHARE of the budget at the latest, then the cosine follows the clock
    assert lr_factor(0, cos, clock=0.0) == pytest.approx(0.1) and lr_factor(5, cos, clock=0.01) == pytest.approx(0.6)
    assert lr_factor(0, cos, clock=WARMUP_CLOCK_SHARE / 2) == pytest.approx(0.5)
    assert lr_factor(5, cos, clock=WARMUP_CLOCK_SHARE) == pytest.approx(cosine(WARMUP_CLOCK_SHARE, 0.1))
    assert lr_factor(5, cos, clock=0.9) == pytest.approx(cosine(0.9, 0.1))
    wsd = TrainConfig(steps=1000, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(100, wsd, clock=0.79) == 1.0 and lr_factor(100, wsd, clock=0.9) == pytest.approx(0.5)
    assert lr_factor(100, wsd, clock=1.0) == pytest.approx(0.0)


def test_grad_accumulation_matches_one_big_batch(shards, tmp_path):
    big = train(tiny_config(shards, tmp_path / "big", "train.batch_size=8", "train.steps=4"))
    small = train(
        tiny_config(
            shards,
            tmp_path / "acc",
            "train.batch_size=2",
            "train.grad_accum=4",
            "train.steps=4",
            "train.eval_batches=8",
        )
    )  # the same 16 eval windows
    for a, b in zip(losses(big), losses(small), strict=True):
        assert a[0] == b[0]
        for x, y in zip(a[1:], b[1:], strict=True):
            assert (x is None and y is None) or abs(x - y) < 1e-5


def test_activation_checkpointing_and_packing(shards, tmp_path):
    plain = train(tiny_config(shards, tmp_path / "plain", "train.steps=3"))
    ckpt = train(tiny_config(shards, tmp_path / "ckpt", "train.steps=3", "train.activation_checkpointing=true"))
    assert losses(plain) == losses(ckpt)
    packed = train(
        tiny_config(
            shards,
            tmp_path / "packed",
            "train.steps=3",
            "train.packed_attention=true",
            "train.schedule=wsd",
            "train.tensorboard=true",
        )
    )
    assert all(math.isfinite(r["loss"]) for r in packed["history"] if "loss" in r)
    assert losses(packed) != losses(plain)


def test_schedules():
    cos = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cos) == pytest.approx(0.1) and lr_factor(9, cos) == pytest.approx(1.0)
    assert lr_factor(10, cos) == pytest.approx(1.0) and lr_factor(100, cos) == pytest.approx(0.1)
    factors = [lr_factor(i, cos) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))
    wsd = TrainConfig(steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, wsd) == 1.0 and lr_factor(79, wsd) == 1.0
    assert lr_factor(90, wsd) == pytest.approx(0.5) and lr_factor(100, wsd) == pytest.approx(0.0)


def test_muon_steps_the_hidden_matrices_and_adamw_the_rest():
    model = FlashLM(get_preset("nano"))
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05), torch.device("cpu"))
    adam, muon = optimizer.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adam = {names[id(p)] for g in adam.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2}
    assert in_adam == set(names.values()) - in_muon and "embed.weight" in in_adam
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3] * len(adam.param_groups) + [0.05]
    model(torch.randint(0, 512, (2, 8))).logits.float().pow(2).mean().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in in_muon)
    assert len(optimizer.state) == len(names)  # one state for every parameter, kept in one mapping


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_muon_is_torchs_in_bf16_and_close_in_fp32(adjust):
    torch.manual_seed(0)
    start = torch.randn(48, 16)
    params = [torch.nn.Parameter(start.clone()) for _ in range(3)]
    opts = [
        torch.optim.Muon([params[0]], lr=0.02, adjust_lr_fn=adjust),
        Muon([params[1]], torch.bfloat16, lr=0.02, adjust_lr_fn=adjust),
        Muon([params[2]], torch.float32, lr=0.02, adjust_lr_fn=adjust),
    ]
    for _ in range(3):
        grad = torch.randn(48, 16)
        for param, opt in zip(params, opts, strict=True):
            param.grad = grad.clone()
            opt.step()
    assert torch.equal(params[0], params[1])  # the same update, bit for bit, in torch's bf16
    moved = (params[0] - start).abs().max()
    assert (params[2] - params[0]).abs().max() < 0.05 * moved  # fp32: the same update, rounded less


def test_no_weight_decay_on_norms_and_embeddings():
    model = FlashLM(get_preset("nano"))
    model.final_norm.requires_grad_(False)
    decay, plain = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("proj.weight") for p in decay["params"])
    assert {names[id(p)] for p in plain["params"]} >= {"embed.weight", "layers.0.attn_norm.weight"}
    assert not any(names[id(p)].startswith("final_norm") for g in (decay, plain) for p in g["params"])
    assert plain["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_bad_inputs_fail_clearly(shards, tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        train(tiny_config(shards, tmp_path, "model.vocab_size=300"))
    with pytest.raises(DataError, match="train.data"):
        train(tiny_config(tmp_path / "nowhere", tmp_path))
    with pytest.raises(ConfigError, match="objective"):
        train(tiny_config(shards, tmp_path, "train.objective=nope"))
    with pytest.raises(ConfigError, match=r"^train\.optimizer: must be one of adamw, muon, got 'sgd'$"):
        train(tiny_config(shards, tmp_path, "train.optimizer=sgd"))
    with pytest.raises(ConfigError, match="train.muon_lr"):
        train(tiny_config(shards, tmp_path, "train.optimizer=muon", "train.muon_lr=0"))
    with pytest.raises(ConfigError, match="train.tokenizer"):
        train(tiny_config(shards, tmp_path, f"train.tokenizer={tmp_path / 'none.json'}"))
    other = Tokenizer.train(iter(["a few words", "and a few more"]), vocab_size=300, show_progress=False)
    with pytest.raises(DataError, match="tokenizer"):
        train(tiny_config(shards, tmp_path, f"train.tokenizer={other.save(tmp_path / 'other')}"))
    train(tiny_config(shards, tmp_path / "done", "train.steps=1"))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tiny_config(shards, tmp_path / "done", "train.steps=2"))  # fresh start over another run


def test_cli_train_and_resume(shards, tmp_path):
    runner = CliRunner()
    args = [
        "train",
        "--config",
        "configs/causal.yaml",
        "--set",
        "model.preset=nano",
        "--set",
        "model.max_seq_len=128",
        "--set",
        "model.sliding_window=16",
        "--set",
        f"train.data={shards}",
        "--set",
        f"train.out={tmp_path}",
        "--set",
        "train.seq_len=32",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.device=cpu",
        "--set",
        "train.eval_batches=1",
        "--set",
        "train.log_every=1",
    ]
    result = runner.invoke(app, [*args, "--set", "train.steps=2"])
    assert result.exit_code == 0, result.output
    assert "step 2: loss" in result.output
    result = runner.invoke(app, [*args, "--set", "train.steps=3", "--resume"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_objectives_plug_in(shards, tmp_path):
    def half_clm(model, batch):
        loss, metrics = clm_loss(model, batch)
        return 0.5 * loss, {"half": 0.5 * metrics["clm_loss"]}

    half = Objective("half_clm", get_objective("clm").make_batch, half_clm)
    base = train(tiny_config(shards, tmp_path / "clm", "train.steps=1"))
    custom = train(tiny_config(shards, tmp_path / "half", "train.steps=1"), objective=half)
    assert custom["history"][0]["loss"] == pytest.approx(0.5 * base["history"][0]["loss"], rel=1e-6)
    assert "half" in custom["history"][0] and "clm_acc" not in custom["history"][0]

    class Scaled(torch.nn.Module):  # a loss with a trainable parameter of its own: trained and checkpointed
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, model, batch):
            loss, metrics = clm_loss(model, batch)
            return self.scale * loss, metrics

    learned = Objective("learned", half.make_batch, Scaled())
    summary = train(tiny_config(shards, tmp_path / "learned", "train.steps=1"), objective=learned)
    saved = torch.load(f"{summary['checkpoint']}/train_state.pt", weights_only=True)["objective"]["scale"]
    assert learned.loss.scale.item() != 0.5 and saved.item() == learned.loss.scale.item()

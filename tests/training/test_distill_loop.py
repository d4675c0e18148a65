"""Distillation through the training loop: the distill: config section, online and cached teachers, exact
resume with a trained projection, student initialisation, the `flashlm distill` CLI."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_utils import build_shards, tiny_config
from typer.testing import CliRunner

from flashlm.cli import app, main
from flashlm.config import DistillConfig, RunConfig, apply_overrides, get_preset, load_run_config, save_yaml
from flashlm.errors import ConfigError, FlashLMError
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import Tokenizer
from flashlm.training import train
from flashlm.training.checkpoint import latest_checkpoint
from flashlm.training.distill import LogitCache


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.getbasetemp() / "distill_shards", n_docs=400)


@pytest.fixture(scope="module")
def teacher(shards, tmp_path_factory):
    """A nano model pre-trained for a few steps, named by its run's `latest` link (a checkpoint with the
    shards' tokenizer)."""
    out = tmp_path_factory.mktemp("teacher")
    train(
        tiny_config(
            shards,
            out,
            "train.steps=25",
            "train.batch_size=8",
            "train.save_every=25",
            "train.eval_every=25",
            "train.lr=1e-2",
        )
    )
    return str(out / "latest")


def kd_values(summary: dict) -> list[float]:
    return [r["distill_kd"] for r in summary["history"] if "distill_kd" in r]


def falls(values: list[float]) -> bool:
    return sum(values[-3:]) / 3 < 0.8 * sum(values[:3]) / 3


def losses(summary: dict) -> list[tuple]:
    return [
        (r["step"], r.get("loss"), r.get("distill_kd"), r.get("distill_hidden"), r.get("val_loss"))
        for r in summary["history"]
    ]


# ---- config -----------------------------------------------------------------------------------------
def test_distill_section_round_trips_and_validates(tmp_path):
    base = {"model": {"preset": "nano"}, "train": {"seq_len": 32}}
    assert RunConfig.from_dict(base).distill is None and "distill" not in RunConfig.from_dict(base).to_dict()
    cfg = RunConfig.from_dict(
        apply_overrides(
            base, ["distill.teacher=/t", "distill.alpha=0.3", "distill.divergence=jsd", "distill.layer_map=[1, 1]"]
        )
    )
    assert cfg.distill == DistillConfig(teacher="/t", alpha=0.3, divergence="generalized_jsd", layer_map=[1, 1])
    save_yaml(cfg, tmp_path / "run.yaml")
    again = load_run_config(tmp_path / "run.yaml")
    assert again.distill == cfg.distill and again.to_dict() == cfg.to_dict()
    recipe = load_run_config("configs/distill-tiny.yaml")
    assert recipe.distill.teacher == "PATH/TO/TEACHER" and recipe.model.d_model == 128
    bad = [
        ("distill.alpha=1.5", "distill.alpha"),
        ("distill.divergence=l2", "distill.divergence"),
        ("distill.student_init=copy", "distill.student_init"),
        ("distill.top_k=0", "distill.top_k"),
        ("distill.layer_map=[a]", "distill.layer_map"),
        ("distill.teacherr=/t", "distill.teacherr"),
        ("distill.temperature=0", "distill.temperature"),
    ]
    for override, key in bad:
        with pytest.raises(ConfigError, match=key) as err:
            RunConfig.from_dict(apply_overrides(base, ["distill.teacher=/t", override]))
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="distill.teacher: not set"):
        RunConfig.from_dict(apply_overrides(base, ["distill.alpha=0.3"]))


# ---- training ---------------------------------------------------------------------------------------
def test_online_and_cached_distillation_train_and_the_kd_term_falls(shards, teacher, tmp_path):
    online = train(
        tiny_config(shards, tmp_path / "online", "train.steps=10", f"distill.teacher={teacher}", "distill.alpha=0.2")
    )
    assert falls(kd_values(online)), kd_values(online)
    row = online["history"][0]
    assert {"clm_loss", "clm_acc", "distill_kd"} <= set(row) and row["loss"] < row["clm_loss"]
    cached = train(
        tiny_config(
            shards,
            tmp_path / "cached",
            "train.steps=10",
            f"distill.teacher={teacher}",
            f"distill.cache={tmp_path / 'cache'}",
            "distill.top_k=16",
            "distill.alpha=0.2",
        )
    )
    cache = LogitCache(tmp_path / "cache")  # built by the run from the teacher, over train.data
    assert cache.top_k == 16 and cache.seq_len == 32 and cache.bytes_per_token == 16 * 4
    assert falls(kd_values(cached)), kd_values(cached)
    # the same windows as a plain CLM run: the hard-label term of step 1 matches it exactly
    plain = train(tiny_config(shards, tmp_path / "plain", "train.steps=1"))
    assert cached["history"][0]["clm_loss"] == plain["history"][0]["clm_loss"] == online["history"][0]["clm_loss"]


def test_masked_batches_are_distilled_with_an_online_teacher(shards, teacher, tmp_path):
    summary = train(
        tiny_config(
            shards,
            tmp_path,
            "train.steps=4",
            f"distill.teacher={teacher}",
            "train.objectives={clm: {ratio: 1}, mlm: {ratio: 1}}",
            "train.eval_every=100",
        )
    )
    rows = [r for r in summary["history"] if "loss" in r]
    assert all(np.isfinite(r["distill_kd"]) and r["distill_kd"] > 0 for r in rows)
    assert any("mlm_loss" in r for r in rows) and any("clm_loss" in r for r in rows)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation"])
def test_fused_clm_path_equals_the_general_composition(shards, teacher, tmp_path, divergence):
    from flashlm.config import TrainConfig
    from flashlm.data.batches import BatchSlot, TokenStream
    from flashlm.data.shards import TokenShards
    from flashlm.training.distill import DistillObjective, cache_teacher, distill_batch, load_teacher
    from flashlm.training.objectives import Objective, clm_loss, get_objective

    batch = distill_batch(TokenStream(TokenShards(shards).tokens), BatchSlot(3, 1, 4), TrainConfig(seq_len=32))
    cfg = DistillConfig(alpha=0.4, divergence=divergence)
    fused_base = get_objective("clm")
    general_base = Objective("clm", fused_base.make_batch, lambda model, b: clm_loss(model, b))
    cache = cache_teacher(teacher, shards, tmp_path / "cache", top_k=16, seq_len=32, progress=False)
    for source in (load_teacher(teacher, "cpu"), load_teacher(cache.path)):
        results = []
        for base in (fused_base, general_base):
            torch.manual_seed(0)
            student = FlashLM(get_preset("nano"))
            loss, metrics = DistillObjective(cfg, source, student.cfg, base=base)(student, batch)
            loss.backward()
            results.append((loss, metrics, student.embed.weight.grad))
        (a, ma, ga), (b, mb, gb) = results
        assert list(ma) == list(mb) == ["clm_loss", "clm_acc", "distill_kd"]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ma["distill_kd"], mb["distill_kd"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


def test_exact_resume_with_a_trained_hidden_state_projection(shards, teacher, tmp_path):
    args = (
        "model.d_model=32",
        "model.d_ff=64",
        f"distill.teacher={teacher}",
        "distill.hidden_weight=1.0",
        "distill.hidden_loss=mse",
        "distill.alpha=0.3",
    )
    whole = train(tiny_config(shards, tmp_path / "whole", *args))
    first = train(tiny_config(shards, tmp_path / "split", *args), callback=lambda step, row: step == 3)
    second = train(tiny_config(shards, tmp_path / "split", *args, "train.resume=true"))
    assert second["resumed_from"].endswith("step_000003")
    assert losses(first) + losses(second) == losses(whole)  # exact float equality, every step
    states = [
        torch.load(latest_checkpoint(tmp_path / run / "checkpoints") / "train_state.pt", weights_only=True)
        for run in ("whole", "split")
    ]
    proj = [s["objective"]["hidden.proj.weight"] for s in states]
    assert proj[0].shape == (64, 32) and torch.equal(proj[0], proj[1])
    assert "objective.hidden.proj.weight" in states[0]["optimizer"]["state"]  # trained by AdamW
    a, b = (
        load_file(str(latest_checkpoint(tmp_path / run / "checkpoints") / "model.safetensors"))
        for run in ("whole", "split")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_student_initialised_from_every_kth_teacher_layer(shards, teacher, tmp_path):
    summary = train(
        tiny_config(
            shards,
            tmp_path,
            "train.steps=1",
            "train.lr=1e-9",
            "model.n_layers=1",
            f"distill.teacher={teacher}",
            "distill.student_init=teacher",
        )
    )
    student = FlashLM.from_pretrained(summary["checkpoint"])
    t = FlashLM.from_pretrained(teacher)
    for (name, p), (_, q) in zip(student.layers[0].named_parameters(), t.layers[0].named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    with pytest.raises(ConfigError, match="student_init"):
        train(
            tiny_config(
                shards,
                tmp_path / "wide",
                "train.steps=1",
                "model.d_model=32",
                "model.d_ff=64",
                f"distill.teacher={teacher}",
                "distill.student_init=teacher",
            )
        )


def test_distill_student_helper_for_the_demo(shards, teacher, tmp_path):
    from flashlm.training.distill import distill_student

    summary = distill_student(
        teacher,
        shards,
        get_preset("nano"),
        2,
        tmp_path,
        alpha=0.2,
        train__batch_size=2,
        train__seq_len=32,
        train__device="cpu",
        train__eval_batches=1,
    )
    assert summary["step"] == 2 and "distill_kd" in summary["history"][-1]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["distill"]["alpha"] == 0.2 and saved["distill"]["teacher"] == teacher


# ---- CLI --------------------------------------------------------------------------------------------
def cli_args(shards, out, teacher) -> list[str]:
    sets = [
        "model.preset=nano",
        "model.max_seq_len=128",
        f"train.data={shards}",
        f"train.out={out}",
        "train.seq_len=32",
        "train.batch_size=4",
        "train.steps=3",
        "train.device=cpu",
        "train.eval_batches=1",
        "train.log_every=1",
        "train.warmup_steps=1",
        f"distill.teacher={teacher}",
    ]
    return ["distill", "--config", "configs/distill-tiny.yaml", *[a for s in sets for a in ("--set", s)]]


def test_cli_distill_cache_then_distill_from_it(shards, teacher, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "distill",
            "cache",
            teacher,
            str(shards),
            "--top-k",
            "8",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "32 bytes per token" in result.output
    result = runner.invoke(app, cli_args(shards, tmp_path / "run", tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    assert "step 3: loss" in result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["distill"]["teacher"] == str(tmp_path / "cache")
    result = runner.invoke(
        app, [*cli_args(shards, tmp_path / "run", tmp_path / "cache"), "--set", "train.steps=4", "--resume"]
    )
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output


def run_main(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["flashlm", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, (captured.out + captured.err).strip()


def test_cli_refuses_a_teacher_with_another_tokenizer(shards, tmp_path, monkeypatch, capsys):
    other = Tokenizer.train(
        iter(["completely different words here", "and other ones"] * 50), vocab_size=300, show_progress=False
    )
    FlashLM(get_preset("nano")).save_pretrained(tmp_path / "t", other)
    code, output = run_main(
        monkeypatch,
        capsys,
        ["distill", "cache", str(tmp_path / "t"), str(shards), "--out", str(tmp_path / "cache"), "--device", "cpu"],
    )
    assert code == 2 and len(output.splitlines()) == 1 and "different tokenizers" in output
    code, output = run_main(monkeypatch, capsys, cli_args(shards, tmp_path / "run", tmp_path / "t"))
    assert code == 2 and len(output.splitlines()) == 1 and "different tokenizers" in output
    with pytest.raises(FlashLMError, match="different tokenizers"):
        train(tiny_config(shards, tmp_path / "lib", f"distill.teacher={tmp_path / 't'}"))

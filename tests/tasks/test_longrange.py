"""Long-range tasks end to end: small models trained on MQAR / passkey, the CLI, and `eval all`."""

from __future__ import annotations

import json
import random

import pytest
import torch
from corpora import write_stories

from flashlm.config import get_preset, replace
from flashlm.errors import ConfigError, FlashLMError
from flashlm.evaluate.lm import IGNORE
from flashlm.model.transformer import FlashLM
from flashlm.tasks.longrange import (
    LongRangeConfig,
    MQARSpec,
    PasskeySpec,
    PasskeyVocab,
    answer_loss,
    collate_mqar,
    collate_passkey,
    longrange_scores,
    mqar_accuracy,
    mqar_items,
    passkey_accuracy,
    passkey_items,
    resolve_pattern,
    train_mqar,
    train_passkey,
)
from flashlm.tasks.run_all import evaluate_all


def tiny(**changes) -> LongRangeConfig:
    """Two-layer "LG" models with a 4-token window: the smallest layout that can learn induction."""
    base = dict(
        patterns=("LG",),
        n_layers=2,
        d_model=64,
        sliding_window=4,
        batch_size=32,
        lr=3e-3,
        warmup_steps=20,
        seed=0,
    )
    return LongRangeConfig(**{**base, **changes})


# ---- items and batches --------------------------------------------------------------------------
def test_items_build_batches_with_targets_only_at_answers():
    rng = random.Random(0)
    vocab = PasskeyVocab()
    items = passkey_items(rng, 6, 48, 80, digits=4)
    assert all(48 <= i.length <= 80 and 0 <= i.depth <= 1 and 1000 <= i.key < 10_000 for i in items)
    batch = collate_passkey(vocab)(items)
    assert batch.inputs.shape[1] == max(i.length for i in items)
    assert ((batch.targets != IGNORE).sum(1) == 4).all()  # the 4 key digits, nothing else
    for row, item in enumerate(items):  # right padding: every row ends with its own answer
        answer = vocab.encode(f" {item.key}")
        assert batch.targets[row, item.length - 4 : item.length].tolist() == answer
    mqar = mqar_items(rng, 50, (32, 64), vocab_size=40, max_pairs_ratio=1 / 4)
    assert all(2 <= i.n_pairs <= min(i.length // 4, 19) for i in mqar)
    built = collate_mqar(40)([MQARSpec(32, 5, 7), MQARSpec(32, 5, 7), MQARSpec(64, 3, 8)])
    assert torch.equal(built.inputs[0], built.inputs[1])  # an item is a seed: rebuilt identically
    assert (built.targets != IGNORE).sum(1).tolist() == [5, 5, 3]
    assert isinstance(PasskeySpec(64, 0.5, 12345), PasskeySpec)


def test_answer_loss_scores_only_the_targets():
    torch.manual_seed(0)
    model = FlashLM(replace(get_preset("nano"), vocab_size=40))
    batch = collate_mqar(40)([MQARSpec(32, 4, 1), MQARSpec(32, 6, 2)])
    loss = answer_loss(model, batch)
    logits = model(batch.inputs).logits
    keep = batch.targets != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep], batch.targets[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_patterns_by_name_and_config_checks():
    assert resolve_pattern("default", 3) == "LLG"
    assert resolve_pattern("default", 6) == "LLLLLG" and resolve_pattern("default", 12) == "LLLLLG"
    assert resolve_pattern("global", 4) == "G" and resolve_pattern("LG", 4) == "LG"
    with pytest.raises(ConfigError):
        resolve_pattern("LXG", 3)
    cfg = LongRangeConfig.from_names(["default", "global"], n_layers=6, train_len=128)
    assert cfg.patterns == ("LLLLLG", "G")
    assert cfg.passkey_lengths == [64, 128, 256, 512]
    assert cfg.model_config("LLLLLG", 40).max_seq_len == 512
    assert LongRangeConfig(train_len=64, min_train_len=48).passkey_lengths == [64, 128, 256]  # 32 too short
    with pytest.raises(ConfigError):
        LongRangeConfig(train_len=32, min_train_len=48)


# ---- learning -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_model_learns_mqar_with_few_pairs():
    torch.set_num_threads(1)
    cfg = tiny(mqar_vocab=32, mqar_train_lengths=(32,), mqar_pairs_ratio=1 / 8, mqar_steps=200)
    model, summary = train_mqar("LG", cfg)
    assert summary["steps"] == 200 and summary["final_loss"] < 0.1 < summary["first_loss"]
    result = mqar_accuracy(model, ((32, 4), (32, 2)), vocab_size=32, samples=64, seed=5)
    assert [s["accuracy"] for s in result["settings"]] >= [0.95, 0.95], result
    untrained = FlashLM(cfg.model_config("LG", 32)).eval()
    assert mqar_accuracy(untrained, ((32, 4),), 32, samples=16)["settings"][0]["accuracy"] < 0.3


@pytest.mark.slow
def test_tiny_model_learns_short_passkeys():
    torch.set_num_threads(1)
    cfg = tiny(patterns=("LLG",), n_layers=3, train_len=64, min_train_len=40, digits=2, passkey_steps=150, lr=5e-3)
    model, summary = train_passkey("LLG", cfg)
    assert summary["final_loss"] < summary["first_loss"] / 3
    grid = passkey_accuracy(model, PasskeyVocab(), [64], (0.0, 0.5, 1.0), samples=10, seed=3, digits=2)
    assert grid["overall"] >= 0.8, grid


# ---- CLI and the report card --------------------------------------------------------------------
def test_cli_eval_longrange_writes_what_the_report_reads(tmp_path):
    from typer.testing import CliRunner

    from flashlm.cli import app

    out = tmp_path / "results"
    args = ["eval", "longrange", "--steps", "3", "--train-len", "64", "--samples", "1", "--layers", "2"]
    result = CliRunner().invoke(app, [*args, "--d-model", "32", "--window", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "longrange.json").read_text())
    res = record["results"]
    assert {"passkey", "mqar", "patterns", "kv_cache", "kv_cache_reference", "summary", "goals"} <= set(res)
    assert [e["pattern"] for e in res["patterns"]] == ["LG", "G"]
    assert res["passkey"]["lengths"] == [64, 128, 256] and len(res["passkey"]["accuracy"][0]) == 5
    assert [(s["seq_len"], s["n_pairs"]) for s in res["mqar"]["settings"]] == [(256, 16), (512, 32)]
    assert {(k["pattern"], k["context"]) for k in res["kv_cache"]} == {
        (p, c) for p in ("LG", "G") for c in (2048, 8192, 32768)
    }
    kv = {(k["pattern"], k["context"]): k["bytes_per_token"] for k in res["kv_cache"]}
    assert kv[("G", 32768)] == kv[("G", 2048)] > kv[("LG", 2048)] > kv[("LG", 32768)]
    assert all(e["train"]["passkey"]["steps"] == 3 and e["loss_history"]["mqar"] for e in res["patterns"])
    assert set(record["scores"]) == set(longrange_scores(res)) and "passkey_1x LG" in record["scores"]
    assert record["settings"]["patterns"] == ["LG", "G"] and "LG" in result.output
    assert "pattern `G`" in record["markdown"] and "KV B/token @32k" in record["markdown"]
    bad = CliRunner().invoke(app, ["eval", "longrange", "--patterns", "LQ", "--out", str(out)])
    assert isinstance(bad.exception, FlashLMError)


@pytest.mark.slow
def test_eval_all_quick_on_a_nano_model(tmp_path, trained_tokenizer):
    from typer.testing import CliRunner

    from flashlm.cli import app

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    FlashLM(replace(get_preset("nano"), vocab_size=trained_tokenizer.vocab_size)).save_pretrained(
        model_dir, tokenizer=trained_tokenizer
    )
    (model_dir / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 6 / s, "val_loss": 7 / s}) for s in (10, 20, 30)) + "\n"
    )
    text = tmp_path / "val.txt"
    write_stories(text, 6, seed=1, separator="\n\n")
    out = tmp_path / "report"
    tasks = "ppl,cloze,efficiency,longrange"
    args = ["eval", "all", str(model_dir), "--data", str(text), "--quick", "--minutes", "0.05"]
    result = CliRunner().invoke(app, [*args, "--tasks", tasks, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    for png in ("accuracy.png", "passkey.png", "loss.png", "task_loss.png"):
        assert (out / png).stat().st_size > 1000 and f"({png})" in report
    for section in ("## Language modelling", "## Efficiency", "## Long-range dependencies"):
        assert section in report
    assert "`cloze` skipped: no --cloze file given" in report
    assert {p.name for p in out.glob("*.json")} == {"ppl.json", "efficiency.json", "longrange.json"}
    longrange = json.loads((out / "longrange.json").read_text())
    assert longrange["settings"]["minutes"] == pytest.approx(0.05)
    # the Python entry point the demo calls, with texts instead of files
    path = evaluate_all(
        model_dir,
        tmp_path / "demo",
        texts=["Once upon a time there was a cat."] * 3,
        quick=True,
        minutes=0.02,
        tasks=["ppl", "longrange"],
    )
    assert path.name == "report.md" and (tmp_path / "demo" / "passkey.png").is_file()
    assert json.loads((tmp_path / "demo" / "ppl.json").read_text())["results"]["documents"] == 3

"""Evaluation: metrics on hand-made cases, perplexity windows, cloze, long-range tasks, efficiency, report."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from corpora import stories
from torch import nn

from flashlm.config import ModelConfig, get_preset, replace
from flashlm.errors import FlashLMError
from flashlm.evaluate import metrics
from flashlm.evaluate.efficiency import (
    efficiency,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    kv_cache_comparison,
)
from flashlm.evaluate.lm import IGNORE, cloze, cloze_row, perplexity, sliding_windows
from flashlm.evaluate.report import write_report, write_result
from flashlm.model.cache import KVCache
from flashlm.model.flops import flops_per_token, matmul_params, mean_causal_keys
from flashlm.model.transformer import FlashLM
from flashlm.tasks.longrange import (
    NEEDLE,
    PasskeyVocab,
    make_mqar_batch,
    make_passkey_batch,
    mqar_accuracy,
    mqar_example,
    passkey_accuracy,
    passkey_example,
)


# ---- fixtures -----------------------------------------------------------------------------------
def paragraphs(n: int) -> list[str]:
    """`n` generated stories, each one paragraph on one line."""
    return stories(n, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    from flashlm.tokenizer import Tokenizer

    return Tokenizer.train(iter(paragraphs(300)), vocab_size=400, show_progress=False)


def nano(pattern: str = "LG", window: int = 8, seed: int = 0, **changes) -> FlashLM:
    torch.manual_seed(seed)
    cfg = replace(get_preset("nano"), layer_pattern=pattern, sliding_window=window, **changes)
    model = FlashLM(cfg).eval()
    with torch.no_grad():  # sharper than a fresh init, so scores differ between tokens
        model.embed.weight.mul_(4.0)
    return model


class Oracle(nn.Module):
    """A stand-in model with one-hot logits chosen by `next_token(row, t)`; for exact scoring tests."""

    def __init__(self, vocab_size: int, next_token, max_seq_len: int = 4096) -> None:
        super().__init__()
        self.cfg = ModelConfig(
            vocab_size=vocab_size,
            d_model=8,
            n_layers=1,
            n_heads=1,
            n_kv_heads=1,
            layer_pattern="G",
            max_seq_len=max_seq_len,
        )
        self.dummy = nn.Parameter(torch.zeros(1))
        self.next_token = next_token

    def forward(self, input_ids: torch.Tensor, mode: str = "causal") -> SimpleNamespace:
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.cfg.vocab_size)
        for b in range(B):
            row = input_ids[b].tolist()
            for t in range(T):
                token = self.next_token(row, t)
                if token is not None:
                    logits[b, t, token] = 20.0
        return SimpleNamespace(logits=logits)


def induction(order: int):
    """Predict what followed the most recent earlier occurrence of the last `order` tokens."""

    def next_token(row: list[int], t: int) -> int | None:
        if t + 1 < order:
            return None
        gram = row[t + 1 - order : t + 1]
        for s in range(t - 1, order - 2, -1):
            if row[s + 1 - order : s + 1] == gram:
                return row[s + 1]
        return None

    return next_token


# ---- metrics ------------------------------------------------------------------------------------
def test_squad_normalisation_em_and_f1_by_hand():
    assert metrics.normalize_answer("  The  Cat, sat!") == "cat sat"
    assert metrics.normalize_answer("An apple a day") == "apple day"
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]; overlap 2
    # precision 2/2 = 1, recall 2/3, F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert metrics.f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert metrics.exact_match("the cat sat", "a cat sat down") == 0.0
    assert metrics.exact_match("The Eiffel Tower!", ["Paris", "eiffel tower"]) == 1.0
    # best gold: "cat sat" -> precision 1, recall 1/2, F1 2/3 ("dog" has no overlap)
    assert metrics.f1_score("cat", ["dog", "cat sat"]) == pytest.approx(2 / 3)
    # repeated tokens count by multiplicity: pred [red, red, red], gold [red, red]: common 2
    # precision 2/3, recall 1, F1 = 2 * 2/3 / (5/3) = 0.8
    assert metrics.f1_score("red red red", "red red") == pytest.approx(0.8)
    assert metrics.f1_score("blue", "green") == 0.0
    scores = metrics.squad_scores(["the cat sat", "Paris"], ["a cat sat down", ["paris", "France"]])
    assert scores["exact_match"] == pytest.approx(50.0) and scores["f1"] == pytest.approx(90.0)


def test_sequence_match_bits_per_byte_and_perplexity():
    assert metrics.accuracy([[1, 2], [3], [4, 5]], [[1, 2], [3, 0], [4, 5]]) == pytest.approx(2 / 3)
    assert metrics.utf8_bytes("héllo") == 6
    assert metrics.bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)  # 8 bits over 4 bytes
    assert metrics.perplexity(3 * math.log(10), 3) == pytest.approx(10.0)


def test_bleu_and_chrf():
    refs = ["the cat is on the mat", "there is a dog in the garden"]
    assert metrics.bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.chrf(refs, refs) == pytest.approx(100.0)
    assert metrics.bleu(["xyz qqq", "uuu vvv"], refs) == pytest.approx(0.0)
    partial = metrics.bleu(["the cat is on a mat", "there is a dog in the garden"], refs)
    assert 0 < partial < 100


# ---- perplexity ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "seq_len", "stride"), [(10, 4, 2), (10, 4, 4), (23, 8, 3), (3, 8, 8), (9, 8, 1)])
def test_sliding_windows_score_every_token_once_with_enough_context(n, seq_len, stride):
    ids = list(range(100, 100 + n))
    scored = []
    for inputs, targets in sliding_windows(ids, seq_len, stride):
        assert len(inputs) == len(targets) <= seq_len
        begin = ids.index(inputs[0])
        for j, y in enumerate(targets):
            if y != IGNORE:
                t = begin + j + 1
                assert y == ids[t]
                assert t - begin >= min(t, seq_len - stride + 1)  # left context of the scored token
                scored.append(t)
    assert scored == list(range(1, n))


def test_stride_equal_to_window_is_non_overlapping_chunks(tokenizer):
    model = nano()
    text = " ".join(paragraphs(3))
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)  # framed as the shards frame documents
    L = 16
    expected = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, L):
            chunk = torch.tensor([ids[start : start + L + 1]])
            logits = model(chunk[:, :-1]).logits
            expected += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
    result = perplexity(model, tokenizer, [text], seq_len=L, stride=L, batch_size=3)
    assert result["tokens"] == len(ids) - 1
    assert result["nats"] == pytest.approx(expected, rel=1e-5)


def test_strided_nats_equal_direct_per_token_scores(tokenizer):
    model = nano()
    text = paragraphs(1)[0]
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    L, s = 12, 5
    expected = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):  # token t is scored in the first window reaching it
            begin = max(0, math.ceil((t - L) / s)) * s
            logits = model(torch.tensor([ids[begin:t]])).logits[0, -1]
            expected -= torch.log_softmax(logits, -1)[ids[t]].item()
    result = perplexity(model, tokenizer, [text], seq_len=L, stride=s)
    assert result["nats"] == pytest.approx(expected, rel=1e-5)
    assert result["bpb"] == pytest.approx(expected / (math.log(2) * len(text.encode())), rel=1e-5)


def test_perplexity_does_not_depend_on_batch_size(tokenizer):
    model = nano()
    texts = paragraphs(5)
    one = perplexity(model, tokenizer, texts, seq_len=24, stride=12, batch_size=1)
    four = perplexity(model, tokenizer, texts, seq_len=24, stride=12, batch_size=4)
    assert one["tokens"] == four["tokens"] and one["bytes"] == four["bytes"] == sum(len(t.encode()) for t in texts)
    for key in ("loss", "ppl", "bpb"):
        assert four[key] == pytest.approx(one[key], rel=1e-6)
    assert one["ppl"] == pytest.approx(math.exp(one["loss"]))


# ---- cloze --------------------------------------------------------------------------------------
def cloze_lines(n: int) -> list[str]:
    return [" ".join(p.split()[:30]) for p in paragraphs(n)]


def test_cloze_row_splits_at_the_last_space(tokenizer):
    line = "Lily went to the park with her mom."
    inputs, targets = cloze_row(tokenizer, line, max_len=64)
    scored = [y for y in targets if y != IGNORE]
    assert tokenizer.decode(scored) == " mom."
    assert tokenizer.decode(inputs + [targets[-1]]) == line
    assert inputs[0] == tokenizer.bos_id


def test_cloze_counts_a_word_only_when_all_its_tokens_match(tokenizer):
    lines = cloze_lines(6)
    rows = {}
    for n, line in enumerate(lines):
        inputs, targets = cloze_row(tokenizer, line, max_len=4096)
        full = inputs + [targets[-1]]
        if n % 2:  # every other passage: the oracle misses only the word's last token
            full[-1] = (full[-1] + 1) % tokenizer.vocab_size
        rows[tuple(inputs)] = full
    oracle = Oracle(tokenizer.vocab_size, lambda row, t: _lookup(rows, row, t))
    result = cloze(oracle, tokenizer, lines, batch_size=4)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["passages"] == 6


def _lookup(rows: dict, row: list[int], t: int) -> int | None:
    """Next token of the stored sequence whose prefix matches the (padded) row."""
    for prefix, full in rows.items():
        if list(prefix) == row[: len(prefix)] and t + 1 < len(full):
            return full[t + 1]
    return None


def test_cloze_on_tinystories_file(tokenizer, tmp_path):
    path = tmp_path / "cloze.txt"
    path.write_text("\n".join(cloze_lines(12)) + "\n\n")
    lines = path.read_text().splitlines()
    result = cloze(nano(), tokenizer, lines, batch_size=5)
    assert result["passages"] == 12
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["target_ppl"] > 1.0 and result["target_tokens"] >= 12
    with pytest.raises(FlashLMError):
        cloze(nano(), tokenizer, ["oneword"])


# ---- long-range tasks ---------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_item_is_well_formed(depth):
    vocab = PasskeyVocab()
    ex = passkey_example(vocab, 200, depth, 48213)
    needle = vocab.encode(NEEDLE.format(key=48213))
    assert ex.prompt_ids[ex.needle_start : ex.needle_start + len(needle)] == needle
    assert vocab.decode(ex.answer_ids) == "4 8 2 1 3"
    inputs, targets = ex.row()
    assert len(inputs) == len(targets) == 200
    n_fill = len(ex.prompt_ids) - 1 - len(needle) - len(vocab.encode(" What is the pass key? The pass key is"))
    assert abs(ex.depth - depth) <= 6 / n_fill  # the nearest sentence boundary (sentences ≤ 6 tokens)
    assert (ex.needle_start - 1) / n_fill == pytest.approx(ex.depth)
    assert [y for y in targets if y != IGNORE] == ex.answer_ids


def test_passkey_with_a_bpe_tokenizer(tokenizer):
    ex = passkey_example(tokenizer, 400, 0.5, 777)
    text = tokenizer.decode(ex.prompt_ids)
    needle = " The pass key is 777. Remember it. 777 is the pass key."
    assert text.count(needle) == 1
    assert text.endswith(" What is the pass key? The pass key is")
    assert tokenizer.decode(ex.answer_ids) == " 777"
    assert len(ex.row()[0]) == 400
    before, after = text.split(needle)
    assert len(before) / (len(before) + len(after)) == pytest.approx(0.5, abs=0.1)


def test_passkey_batch_targets_only_the_answer():
    vocab = PasskeyVocab()
    inputs, targets = make_passkey_batch(random.Random(0), vocab, 4, 96, digits=4)
    assert inputs.shape == targets.shape == (4, 96)
    scored = targets != IGNORE
    assert scored.sum(1).tolist() == [4] * 4 and scored[:, -4:].all()
    assert torch.equal(targets[:, -4:-1], inputs[:, -3:])  # teacher forcing: next input = target


def test_passkey_accuracy_grid_with_an_induction_oracle():
    vocab = PasskeyVocab()
    oracle = Oracle(vocab.vocab_size, induction(3))
    result = passkey_accuracy(oracle, vocab, lengths=(64, 256), depths=(0.0, 0.5, 1.0), samples=3)
    assert result["accuracy"] == [[1.0] * 3] * 2 and result["overall"] == 1.0
    real = passkey_accuracy(nano(vocab_size=64), vocab, lengths=(48,), depths=(0.5,), samples=2)
    assert 0.0 <= real["overall"] <= 1.0


def test_mqar_rows_pairs_then_queries_with_labels_only_there():
    V, T, n = 64, 64, 8
    inputs, targets = mqar_example(random.Random(1), V, T, n)
    assert len(inputs) == len(targets) == T
    keys, values = inputs[0 : 2 * n : 2], inputs[1 : 2 * n : 2]
    assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
    assert len(set(keys)) == n
    lookup = dict(zip(keys, values, strict=True))
    queries = [t for t, y in enumerate(targets) if y != IGNORE]
    assert len(queries) == n and min(queries) >= 2 * n
    assert sorted(inputs[t] for t in queries) == sorted(keys)
    assert all(targets[t] == lookup[inputs[t]] for t in queries)
    assert all(inputs[t] == 0 for t in range(2 * n, T) if t not in queries)  # values never leak
    x, y = make_mqar_batch(random.Random(2), 3, V, T, n)
    assert x.shape == y.shape == (3, T) and ((y != IGNORE).sum(1) == n).all()


def test_mqar_accuracy_with_an_associative_oracle():
    oracle = Oracle(128, induction(1))
    result = mqar_accuracy(oracle, settings=((64, 8), (128, 16)), samples=3)
    assert [s["accuracy"] for s in result["settings"]] == [1.0, 1.0]
    assert result["settings"][1]["queries"] == 3 * 16
    chance = mqar_accuracy(nano(), settings=((64, 8),), vocab_size=128, samples=4)
    assert chance["settings"][0]["accuracy"] < 0.5


@pytest.mark.parametrize(("pattern", "layers", "window"), [("LG", 2, 16), ("G", 3, 16), ("LLLLLG", 6, 32)])
@pytest.mark.parametrize("context", [8, 32, 100])
def test_kv_bytes_match_the_allocated_cache(pattern, layers, window, context):
    cfg = replace(get_preset("nano"), layer_pattern=pattern, n_layers=layers, sliding_window=window)
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(cfg, 2, context, "meta", dtype)
        assert kv_cache_bytes(cfg, context, 2, dtype) == cache.nbytes()
        assert kv_cache_bytes_per_token(cfg, context, dtype) * context == pytest.approx(cache.nbytes() / 2)


def test_kv_comparison_local_global_versus_all_global():
    rows = kv_cache_comparison(get_preset("tiny"))  # 6 layers: 5 local, 1 global
    by = {(r["pattern"], r["context"]): r["bytes_per_token"] for r in rows}
    assert {c for _, c in by} == {2048, 8192, 32768}
    assert by[("G", 2048)] == by[("G", 32768)]  # all-global: constant per token
    assert by[("LLLLLG", 32768)] < by[("LLLLLG", 2048)] < by[("G", 2048)]
    assert by[("LLLLLG", 32768)] == pytest.approx(by[("G", 32768)] / 6, rel=0.05)


# ---- efficiency ---------------------------------------------------------------------------------
def test_flops_formula_pieces():
    assert mean_causal_keys(4, None) == pytest.approx(2.5)
    assert mean_causal_keys(4, 2) == pytest.approx((1 + 2 + 2 + 2) / 4)
    cfg = get_preset("nano")
    n = matmul_params(cfg)
    # per layer q, k, v, o (H·h = 64, K·h = 32) and the gated MLP (f = 128); plus the tied LM head
    assert n == cfg.n_layers * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 512 * 64
    f = flops_per_token(cfg, 64)
    assert f["decode"] == 2 * n + 4 * 64 * (16 + 64)  # local layer sees 16 keys, global 64
    assert f["training"] > 3 * f["prefill"] - 1


def test_efficiency_on_a_nano_model():
    model = nano()
    result = efficiency(model, batch_sizes=(1, 3), prompt_len=16, new_tokens=6)
    assert result["parameters"]["total"] == model.num_parameters()
    assert result["parameters"]["embedding"] == 512 * 64
    for run in result["runs"]:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "latency_p50_s"):
            assert run[key] > 0
        assert run["latency_p95_s"] >= run["latency_p50_s"]
        assert run["peak_memory_bytes"] >= run["peak_memory_increase_bytes"] >= 0
        assert run["peak_memory_bytes"] > sum(p.numel() * 4 for p in model.parameters())
        assert run["kv_cache_bytes"] == KVCache(model.cfg, run["batch_size"], 22, "meta").nbytes()
    assert {r["pattern"] for r in result["kv_cache_comparison"]} == {"LG", "G"}


# ---- report -------------------------------------------------------------------------------------
def test_results_and_report(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("hello world\n")
    results = tmp_path / "results"
    write_result(
        results,
        "ppl",
        {"loss": 2.0, "ppl": 7.39, "bpb": 1.2, "tokens": 10, "bytes": 12},
        model="m",
        data=[data],
        seed=0,
        settings={"seq_len": 16},
    )
    passkey = {"lengths": [32, 64], "depths": [0.0, 1.0], "accuracy": [[1.0, 0.5], [0.0, 1.0]]}
    write_result(
        results,
        "longrange",
        {"passkey": passkey, "kv_cache": kv_cache_comparison(get_preset("nano"))},
        model="m",
        seed=1,
        scores={"passkey@32": 0.75, "passkey@64": 0.5},
    )
    record = json.loads((results / "ppl.json").read_text())
    assert record["data"][str(data)] == metrics_sha(data)
    assert {"torch", "flashlm", "python"} <= set(record["versions"])
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text("\n".join(json.dumps({"step": s, "loss": 5 / s, "val_loss": 6 / s}) for s in (1, 2, 3)))
    report = write_report(results, metrics=metrics_file)
    text = report.read_text()
    assert "## Language modelling" in text and "## Long-range dependencies" in text
    assert text.index("Language modelling") < text.index("Long-range")
    for png in ("accuracy.png", "passkey.png", "loss.png"):
        assert (results / png).stat().st_size > 1000 and f"({png})" in text


def metrics_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_eval_commands(tokenizer, tmp_path):
    from typer.testing import CliRunner

    from flashlm.cli import app

    model_dir = tmp_path / "model"
    nano(max_seq_len=64).save_pretrained(model_dir, tokenizer=tokenizer)
    text = tmp_path / "val.txt"
    text.write_text("\n\n".join(paragraphs(3)) + "\n")
    lambada = tmp_path / "lambada.txt"
    lambada.write_text("\n".join(cloze_lines(4)) + "\n")
    out = tmp_path / "results"
    runner = CliRunner()
    commands = [
        ["eval", "ppl", str(model_dir), str(text), "--seq-len", "32", "--stride", "16", "--out", str(out)],
        ["eval", "cloze", str(model_dir), str(lambada), "--out", str(out)],
        [
            "eval",
            "efficiency",
            str(model_dir),
            "-b",
            "1",
            "-b",
            "2",
            "--prompt-len",
            "8",
            "--new-tokens",
            "4",
            "--out",
            str(out),
        ],
        ["eval", "report", str(out)],
    ]
    for command in commands:
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    ppl = json.loads((out / "ppl.json").read_text())
    assert ppl["results"]["documents"] == 3 and ppl["settings"]["stride"] == 16
    assert json.loads((out / "cloze.json").read_text())["results"]["passages"] == 4
    assert "## Efficiency" in (out / "report.md").read_text()
    missing = runner.invoke(app, ["eval", "ppl", str(model_dir), str(tmp_path / "nope.txt")])
    assert isinstance(missing.exception, FlashLMError)

"""Supervised fine-tuning: example framing, batches, schedule budgets, and learning a copy task."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flashlm.config import ModelConfig
from flashlm.data.batches import IGNORE_INDEX
from flashlm.generation import greedy_decode
from flashlm.model.transformer import FlashLM
from flashlm.training.finetune import (
    Example,
    FinetuneConfig,
    collate_prefix,
    epoch_batches,
    finetune,
    make_example,
    new_model,
)
from flashlm.training.objectives import prefix_lm_loss
from flashlm.training.optim import set_lr

IDS = SimpleNamespace(bos_id=1, eos_id=2, sep_id=4, pad_id=0)  # make_example with id lists needs no vocab


def tiny_model(vocab: int = 48, seed: int = 0) -> FlashLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        d_ff=128,
        layer_pattern="G",
        max_seq_len=32,
    )
    return FlashLM(cfg)


def test_make_example_frames_and_truncates_source_from_the_left():
    ex = make_example(IDS, [10, 11, 12, 13], [20, 21])
    assert ex.ids == [1, 10, 11, 12, 13, 4, 20, 21, 2]
    assert ex.prefix_len == 6
    short = make_example(IDS, [10, 11, 12, 13], [20, 21], max_len=7)
    assert short.ids == [1, 12, 13, 4, 20, 21, 2] and short.prefix_len == 4


def test_collate_prefix_masks_everything_but_target_and_eos():
    batch = collate_prefix([Example([1, 10, 11, 4, 20, 2], 4), Example([1, 10, 4, 20, 21, 22, 2], 3)])
    assert batch.mode == "prefix"
    assert batch.prefix_len.tolist() == [4, 3]
    assert batch.input_ids.tolist() == [[1, 10, 11, 4, 20, 0], [1, 10, 4, 20, 21, 22]]
    ignore = IGNORE_INDEX
    assert batch.targets.tolist() == [
        [ignore, ignore, ignore, 20, 2, ignore],
        [ignore, ignore, 20, 21, 22, 2],
    ]
    assert batch.doc_ids.tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]


def test_padding_does_not_change_a_rows_loss():
    model = tiny_model().eval()
    short, long = Example([1, 10, 11, 4, 20, 2], 4), Example([1, 10, 11, 12, 13, 14, 4, 20, 21, 2], 7)
    with torch.no_grad():
        alone = prefix_lm_loss(model, collate_prefix([short]), rows_equal=False)[0]
        padded = collate_prefix([short, long])
        out = model(padded.input_ids, mode="prefix", prefix_len=padded.prefix_len, doc_ids=padded.doc_ids)
        row = torch.nn.functional.cross_entropy(out.logits[0], padded.targets[0], ignore_index=IGNORE_INDEX)
    assert torch.allclose(alone, row, atol=1e-5)


def test_epoch_batches_are_seeded_and_bucketed():
    lengths = list(np.random.default_rng(0).integers(5, 500, size=200))
    a = epoch_batches(lengths, 8, seed=3, epoch=0, bucket=5)
    assert [b.tolist() for b in a] == [b.tolist() for b in epoch_batches(lengths, 8, seed=3, epoch=0, bucket=5)]
    assert sorted(np.concatenate(a).tolist()) == list(range(200))
    assert [b.tolist() for b in a] != [b.tolist() for b in epoch_batches(lengths, 8, seed=3, epoch=1, bucket=5)]
    spread = np.mean([np.ptp(np.asarray(lengths)[b]) for b in a])
    plain = np.mean([np.ptp(np.asarray(lengths)[b]) for b in epoch_batches(lengths, 8, 3, 0, bucket=0)])
    assert spread < plain / 3


def copy_examples(n: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [make_example(IDS, src, src) for src in rng.integers(8, 40, size=(n, 3)).tolist()]


def copy_accuracy(model: FlashLM, examples: list[Example]) -> float:
    outs = greedy_decode(model, [e.ids[: e.prefix_len] for e in examples], 4, eos_id=2, batch_size=16)
    return float(np.mean([out == e.ids[e.prefix_len : -1] for out, e in zip(outs, examples, strict=True)]))


def test_finetune_learns_to_copy():
    model = tiny_model()
    train, test = copy_examples(512, 0), copy_examples(64, 1)
    before = copy_accuracy(model, test)
    cfg = FinetuneConfig(
        epochs=40, max_steps=150, batch_size=32, lr=3e-3, warmup_steps=20, progress=False, log_every=20
    )
    summary = finetune(model, train, cfg)
    assert summary["steps"] == 150
    assert summary["final_loss"] < 0.2 * summary["first_loss"]
    assert before == 0.0 and copy_accuracy(model, test) > 0.8
    assert not model.training


def test_finetune_with_muon_learns_to_copy_and_scales_muons_lr():
    model = tiny_model()
    train, test = copy_examples(512, 0), copy_examples(64, 1)
    cfg = FinetuneConfig(
        epochs=40, max_steps=100, batch_size=32, lr=3e-3, optimizer="muon", muon_lr=0.02, progress=False
    )
    seen = []
    original = set_lr

    def spy(optimizer, lr):
        original(optimizer, lr)
        seen.append([group["lr"] for group in optimizer.param_groups])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("flashlm.training.finetune.set_lr", spy)
        summary = finetune(model, train, cfg)
    assert summary["final_loss"] < 0.2 * summary["first_loss"] and copy_accuracy(model, test) > 0.8
    for lrs in seen:  # AdamW's groups at the schedule's lr, Muon's at muon_lr / lr times it
        assert lrs[-1] == pytest.approx(lrs[0] * 0.02 / 3e-3)


def test_budgets_stop_the_run():
    model = tiny_model()
    examples = copy_examples(64, 0)
    steps = finetune(model, examples, FinetuneConfig(epochs=100, max_steps=5, batch_size=8, progress=False))
    assert steps["steps"] == 5
    timed = finetune(model, examples, FinetuneConfig(epochs=10_000, max_minutes=0.02, batch_size=8, progress=False))
    assert 0 < timed["steps"] < 80_000 and timed["seconds"] < 10
    assert timed["final_loss"] is not None


def test_stop_loss_ends_a_converged_run_early():
    examples = copy_examples(512, 0)
    cfg = FinetuneConfig(
        epochs=40,
        max_steps=400,
        batch_size=32,
        lr=3e-3,
        warmup_steps=20,
        progress=False,
        log_every=10,
        stop_loss=0.05,
        stop_windows=3,
    )
    summary = finetune(tiny_model(), examples, cfg)
    tail = [loss for _, loss in summary["history"][-3:]]
    assert summary["steps"] < 400 and summary["steps"] % 10 == 0  # stops on a logged window
    assert all(loss < 0.05 for loss in tail)
    assert (
        finetune(
            tiny_model(),
            examples,
            FinetuneConfig(epochs=10, max_steps=30, batch_size=32, progress=False, stop_loss=1e-9),
        )["steps"]
        == 30
    )


def test_new_model_sizes_the_vocabulary_to_the_tokenizer():
    texts = ["the cat sat on the mat", "the dog sat on the log"] * 20
    model, tok = new_model(texts, "nano", vocab_size=300, layer_pattern="G")
    assert model.cfg.vocab_size == tok.vocab_size and model.cfg.layer_pattern == "G"
    with pytest.raises(ValueError):
        make_example(IDS, [5] * 10, [6] * 10, max_len=12)


def test_greedy_decode_does_not_depend_on_batching():
    model = tiny_model(seed=3)
    prompts = [e.ids[: e.prefix_len] for e in copy_examples(10, 2)] + [[1, 9, 4], [1, 8, 9, 10, 11, 12, 4]]
    batched = greedy_decode(model, prompts, 5, eos_id=2, batch_size=16)
    assert batched == greedy_decode(model, prompts, 5, eos_id=2, batch_size=1)
    assert all(len(out) <= 5 and 2 not in out for out in batched)


def test_bad_settings_are_refused():
    from flashlm.errors import ConfigError

    with pytest.raises(ConfigError, match="clock"):
        finetune(tiny_model(), copy_examples(4, 0), FinetuneConfig(clock="gpu", progress=False))
    with pytest.raises(ConfigError, match="precision"):
        finetune(tiny_model(), copy_examples(4, 0), FinetuneConfig(precision="fp8", progress=False))
    with pytest.raises(ConfigError, match="finetune.optimizer: must be adamw or muon"):
        finetune(tiny_model(), copy_examples(4, 0), FinetuneConfig(optimizer="sgd", progress=False))

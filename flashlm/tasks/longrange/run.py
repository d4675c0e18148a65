"""Training small models on the long-range tasks, one pair per layer pattern, and scoring them.

`LongRangeConfig` holds the models, data and budgets (and why these settings: its docstring);
`train_passkey` / `train_mqar` fit a fresh model on `PasskeySpec` / `MQARSpec` items (built into
`TaskBatch`es when batched, scored by `answer_loss`); `run_longrange` trains and scores both per
pattern and adds the KV-cache sizes of each (`flashlm.evaluate.efficiency.kv_cache_comparison`);
`write_longrange` writes `longrange.json`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flashlm.errors import ConfigError
from flashlm.evaluate.efficiency import kv_cache_comparison
from flashlm.evaluate.lm import IGNORE, collate
from flashlm.evaluate.results import write_result
from flashlm.tasks.longrange.synthetic import (
    PasskeyVocab,
    mqar_accuracy,
    mqar_example,
    passkey_accuracy,
    passkey_example,
    random_key,
)
from flashlm.tasks.longrange_config import LongRangeConfig, resolve_pattern


# ---- training small models on the tasks ---------------------------------------------------------
@dataclass
class TaskBatch:
    """Inputs [B, T] and targets (IGNORE except at the answers) of a synthetic-task batch."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(self.inputs.to(device), self.targets.to(device))


def answer_loss(model: Any, batch: TaskBatch) -> torch.Tensor:
    """Mean cross-entropy at the scored positions; logits only there."""
    out = model(batch.inputs, compute_logits=False)
    keep = batch.targets != IGNORE
    return F.cross_entropy(model.logits(out.hidden[keep]).float(), batch.targets[keep])


@dataclass(frozen=True)
class PasskeySpec:
    """A passkey training item, built when batched: `length` tokens wide, needle at `depth`."""

    length: int
    depth: float
    key: int


@dataclass(frozen=True)
class MQARSpec:
    """An MQAR training item, built when batched from its own `seed`."""

    length: int
    n_pairs: int
    seed: int


def passkey_items(rng: random.Random, n: int, min_len: int, max_len: int, digits: int = 5) -> list[PasskeySpec]:
    """`n` passkey items, lengths uniform in [min_len, max_len] and depths uniform in [0, 1]."""
    return [PasskeySpec(rng.randint(min_len, max_len), rng.random(), random_key(rng, digits)) for _ in range(n)]


def collate_passkey(tok: Any) -> Any:
    """A collate function building `PasskeySpec` items into a right-padded `TaskBatch`."""

    def build(items: Sequence[PasskeySpec]) -> TaskBatch:
        rows = [passkey_example(tok, s.length, s.depth, s.key).row() for s in items]
        return TaskBatch(*collate(rows, tok.pad_id or 0))

    return build


def mqar_items(
    rng: random.Random,
    n: int,
    lengths: Sequence[int],
    vocab_size: int,
    max_pairs_ratio: float = 1 / 8,
    min_pairs: int = 2,
) -> list[MQARSpec]:
    """`n` MQAR items: a length from `lengths`, pairs uniform in [min_pairs, length · max_pairs_ratio]
    (at most vocab_size/2 - 1, the number of distinct keys)."""
    cap = vocab_size // 2 - 1
    items = []
    for _ in range(n):
        length = rng.choice(list(lengths))
        high = min(cap, max(min_pairs, int(length * min(max_pairs_ratio, 0.25))))
        items.append(MQARSpec(length, rng.randint(min(min_pairs, high), high), rng.getrandbits(32)))
    return items


def collate_mqar(vocab_size: int) -> Any:
    """A collate function building `MQARSpec` items into a `TaskBatch`."""

    def build(items: Sequence[MQARSpec]) -> TaskBatch:
        rows = [mqar_example(random.Random(s.seed), vocab_size, s.length, s.n_pairs) for s in items]
        return TaskBatch(*collate(rows))

    return build


def train_passkey(pattern: str, cfg: LongRangeConfig, runs: int = 1) -> tuple[Any, dict[str, Any]]:
    """A fresh model with `pattern` trained on passkey items; (model, fit summary)."""
    from flashlm.model.transformer import FlashLM
    from flashlm.training.finetune import fit

    vocab = PasskeyVocab()
    torch.manual_seed(cfg.seed)
    model = FlashLM(cfg.model_config(pattern, vocab.vocab_size))
    rng = random.Random(cfg.seed)
    items = passkey_items(rng, cfg.passkey_steps * cfg.batch_size, cfg.min_train_len, cfg.train_len, cfg.digits)
    ft = cfg.finetune_config(cfg.passkey_steps, runs)
    return model, fit(model, items, collate_passkey(vocab), answer_loss, ft, [i.length for i in items])


def train_mqar(pattern: str, cfg: LongRangeConfig, runs: int = 1) -> tuple[Any, dict[str, Any]]:
    """A fresh model with `pattern` trained on MQAR items; (model, fit summary)."""
    from flashlm.model.transformer import FlashLM
    from flashlm.training.finetune import fit

    torch.manual_seed(cfg.seed + 1)
    model = FlashLM(cfg.model_config(pattern, cfg.mqar_vocab))
    rng = random.Random(cfg.seed + 1)
    items = mqar_items(
        rng, cfg.mqar_steps * cfg.batch_size, cfg.mqar_train_lengths, cfg.mqar_vocab, cfg.mqar_pairs_ratio
    )
    ft = cfg.finetune_config(cfg.mqar_steps, runs)
    return model, fit(model, items, collate_mqar(cfg.mqar_vocab), answer_loss, ft, [i.length for i in items])


GOALS = {"passkey_train_len": 1.0, "passkey_4x": 0.9, "mqar": 0.99}
REFERENCE_PRESET = "base"


def run_longrange(cfg: LongRangeConfig | None = None, log: Any = None) -> dict[str, Any]:
    """Train and score a passkey and an MQAR model per layer pattern; KV-cache bytes of each pattern.

    `results["passkey"]` / `results["mqar"]` are the first (default) pattern's; `results["patterns"]`
    holds every pattern's grids, training summaries and loss histories.
    """
    cfg = cfg or LongRangeConfig()
    if not cfg.patterns:
        raise ConfigError("longrange needs at least one layer pattern")
    previous = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_longrange(cfg, log)
    finally:
        torch.set_num_threads(previous)


def _run_longrange(cfg: LongRangeConfig, log: Any) -> dict[str, Any]:
    import time

    from flashlm.config import get_preset

    say = log or (lambda message: None)
    began = time.perf_counter()
    runs = 2 * len(cfg.patterns)
    vocab = PasskeyVocab()
    entries = []
    for pattern in cfg.patterns:
        say(f"{pattern}: training a passkey model")
        model, pk_train = train_passkey(pattern, cfg, runs)
        pk_params = model.num_parameters()
        passkey = passkey_accuracy(
            model, vocab, cfg.passkey_lengths, cfg.depths, cfg.passkey_samples, cfg.seed + 2, cfg.digits
        )
        say(f"{pattern}: passkey by length {_by_length(passkey)}; training an MQAR model")
        model, mq_train = train_mqar(pattern, cfg, runs)
        mqar = mqar_accuracy(model, cfg.mqar_settings, cfg.mqar_vocab, cfg.mqar_samples, cfg.seed + 3)
        say(f"{pattern}: MQAR {[round(s['accuracy'], 4) for s in mqar['settings']]}")
        entries.append(
            {
                "pattern": pattern,
                "passkey": passkey,
                "passkey_by_length": _by_length(passkey),
                "mqar": mqar,
                "train": {"passkey": _summary(pk_train), "mqar": _summary(mq_train)},
                "loss_history": {"passkey": pk_train["history"], "mqar": mq_train["history"]},
                "parameters": {"passkey": pk_params, "mqar": model.num_parameters()},
            }
        )
    first = entries[0]
    base_cfg = cfg.model_config(cfg.patterns[0], vocab.vocab_size)
    reference = get_preset(REFERENCE_PRESET)
    return {
        "train_len": cfg.train_len,
        "passkey": first["passkey"],
        "mqar": first["mqar"],
        "patterns": entries,
        "kv_cache": kv_cache_comparison(base_cfg, cfg.kv_contexts, cfg.patterns),
        "kv_cache_reference": {
            "preset": REFERENCE_PRESET,
            "rows": kv_cache_comparison(reference, cfg.kv_contexts, (reference.layer_pattern, "G")),
        },
        "goals": GOALS,
        "summary": [_summary_row(e, cfg) for e in entries],
        "train_seconds": sum(e["train"][t]["seconds"] for e in entries for t in ("passkey", "mqar")),
        "total_seconds": time.perf_counter() - began,
    }


def _by_length(passkey: dict[str, Any]) -> dict[str, float]:
    """Mean accuracy over depths for every length."""
    return {str(n): sum(row) / len(row) for n, row in zip(passkey["lengths"], passkey["accuracy"], strict=True)}


def _summary(train: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train.items() if k != "history"}


def _summary_row(entry: dict[str, Any], cfg: LongRangeConfig) -> dict[str, Any]:
    """Headline figures of one pattern: passkey at 1×, 2×, 4× the training length, MQAR settings."""
    by_length = entry["passkey_by_length"]
    row: dict[str, Any] = {"pattern": entry["pattern"]}
    for multiple in (1, 2, 4):
        key = str(multiple * cfg.train_len)
        if key in by_length:
            row[f"passkey_{multiple}x"] = by_length[key]
    for s in entry["mqar"]["settings"]:
        row[f"mqar_{s['seq_len']}_{s['n_pairs']}"] = s["accuracy"]
    row["train_seconds"] = entry["train"]["passkey"]["seconds"] + entry["train"]["mqar"]["seconds"]
    return row


def longrange_scores(results: dict[str, Any]) -> dict[str, float]:
    """Accuracy figures for the report chart: every headline figure of every pattern."""
    scores = {}
    for row in results.get("summary", []):
        for key, value in row.items():
            if key.startswith(("passkey_", "mqar_")):
                scores[f"{key} {row['pattern']}"] = value
    return scores


def write_longrange(
    results_dir: Any, cfg: LongRangeConfig | None = None, log: Any = None
) -> tuple[Any, dict[str, Any]]:
    """Run `run_longrange` and write `results_dir/longrange.json` (+ .md); (path, results)."""
    from dataclasses import asdict

    cfg = cfg or LongRangeConfig()
    results = run_longrange(cfg, log)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("seed", "progress")}
    path = write_result(
        results_dir,
        "longrange",
        results,
        model="small models trained on the synthetic tasks",
        seed=cfg.seed,
        settings=settings,
        scores=longrange_scores(results),
    )
    return path, results


__all__ = [
    "GOALS",
    "REFERENCE_PRESET",
    "LongRangeConfig",
    "MQARSpec",
    "PasskeySpec",
    "TaskBatch",
    "answer_loss",
    "collate_mqar",
    "collate_passkey",
    "longrange_scores",
    "mqar_items",
    "passkey_items",
    "resolve_pattern",
    "run_longrange",
    "train_mqar",
    "train_passkey",
    "write_longrange",
]

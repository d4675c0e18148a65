"""Masked-LM and next-sentence-prediction evaluation, and fill-mask.

Both metrics run on fixed, deterministic batches of a held-out shard split (default "val"):

- **MLM accuracy**: evenly spaced windows, each masked with its own generator seeded by
  ``(seed, window index)``; top-1 accuracy over the masked tokens. ``unigram_acc`` is the accuracy of
  always predicting the most frequent masked token (the best any context-free guess can do).
- **NSP accuracy**: ``<bos> A <sep> B <eos>`` pairs, one generator per pair, without masks; the model
  is a `FlashLMForPretraining` (a FlashLM with its NSP head: ``FlashLMForPretraining.from_pretrained``).

A model predicts masked tokens either at the previous position (masked next-token prediction,
GPT-BERT, the default) or in place (BERT). `trained_next_token` reads which one from a checkpoint's
training config; models without one are taken to use next-token prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flashlm.data.batches import (
    IGNORE_INDEX,
    Batch,
    SpecialTokens,
    TokenStream,
    eval_starts,
    masked_windows,
    nsp_pairs,
)
from flashlm.data.masking import Masking
from flashlm.errors import DataError

STATE_FILE = "train_state.pt"


# ---- inputs ---------------------------------------------------------------------------------------
def open_split(shards_dir: str | Path, tokenizer: Any = None, split: str = "val") -> TokenStream:
    """A shard split as a stream with the tokenizer's special ids (default: the shards' tokenizer.json)."""
    from flashlm.data.shards import TokenShards
    from flashlm.tokenizer import TOKENIZER_FILE, Tokenizer

    shards = TokenShards(shards_dir, split=split)
    if tokenizer is None:
        path = Path(shards_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"{shards_dir}: no {TOKENIZER_FILE}; pass the model's tokenizer")
        tokenizer = Tokenizer.load(path)
    shards.check_tokenizer(tokenizer)
    if len(shards) == 0:
        raise DataError(f"{shards_dir}: the {split} split is empty; prepare shards with a val_fraction > 0")
    specials = SpecialTokens.from_tokenizer(tokenizer)
    return TokenStream(shards.tokens, np.asarray(shards.doc_offsets), shards.meta.get("eos_id"), specials)


def training_config(model_dir: str | Path) -> dict[str, Any]:
    """The `train` settings a checkpoint was trained with ({} for a plain model directory)."""
    path = Path(model_dir) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged state says nothing about the convention: fall back to the default
        return {}
    config = state.get("config") if isinstance(state, dict) else None
    train = config.get("train") if isinstance(config, dict) else None
    return dict(train) if isinstance(train, dict) else {}


def trained_next_token(model_dir: str | Path) -> bool:
    """Whether the model at `model_dir` was trained with masked next-token prediction (default True)."""
    masking = training_config(model_dir).get("masking") or {}
    return bool(masking.get("next_token", True)) if isinstance(masking, dict) else True


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---- metrics --------------------------------------------------------------------------------------
@torch.no_grad()
def mlm_accuracy(
    model: nn.Module,
    stream: TokenStream,
    seq_len: int = 128,
    windows: int = 256,
    batch_size: int = 16,
    rate: float = 0.15,
    next_token: bool = True,
    seed: int = 0,
    per_document: bool = True,
) -> dict[str, Any]:
    """Top-1 accuracy (and loss) on the masked tokens of `windows` fixed held-out windows."""
    model.eval()
    masking = Masking(rate=rate)
    starts = eval_starts(len(stream), seq_len, windows)
    hits, nats, targets_seen = 0, 0.0, []
    for first in range(0, len(starts), batch_size):
        index = range(first, min(first + batch_size, len(starts)))
        rngs = [np.random.default_rng([seed, i]) for i in index]
        batch = masked_windows(
            stream, starts[list(index)], seq_len, rngs, masking, next_token, per_document=per_document
        )
        logits, targets = _masked_logits(model, batch)
        hits += int((logits.argmax(-1) == targets).sum())
        nats += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
        targets_seen.append(targets.cpu().numpy())
    seen = np.concatenate(targets_seen) if targets_seen else np.zeros(0, dtype=np.int64)
    n = len(seen)
    if n == 0:
        raise DataError("no masked tokens in the evaluation windows; use more data or a higher rate")
    unigram = np.bincount(seen).max() / n
    return {
        "mlm_acc": hits / n,
        "mlm_loss": nats / n,
        "unigram_acc": float(unigram),
        "masked_tokens": n,
        "windows": len(starts),
        "seq_len": seq_len,
        "rate": rate,
        "next_token": next_token,
    }


def _masked_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    batch = batch.to(_device(model))
    out = model(batch.input_ids, mode=batch.mode, doc_ids=batch.doc_ids, compute_logits=False)
    valid = batch.targets != IGNORE_INDEX
    return model.logits(out.hidden[valid]), batch.targets[valid]


@torch.no_grad()
def nsp_accuracy(
    model: nn.Module, stream: TokenStream, seq_len: int = 128, pairs: int = 512, batch_size: int = 32, seed: int = 0
) -> dict[str, Any]:
    """Accuracy of the NSP head on `pairs` fixed held-out pairs (half true continuations on average).

    `model` carries the head (`flashlm.model.heads.FlashLMForPretraining`)."""
    if not hasattr(model, "nsp_logits"):
        raise TypeError(
            f"nsp_accuracy needs a model with its NSP head, not a bare {type(model).__name__}: "
            "load it with FlashLMForPretraining.from_pretrained (flashlm.model.heads)"
        )
    model.eval()
    hits, positives = 0, 0
    for first in range(0, pairs, batch_size):
        rngs = [np.random.default_rng([seed, 1, i]) for i in range(first, min(first + batch_size, pairs))]
        batch = nsp_pairs(stream, seq_len, rngs).to(_device(model))
        out = model(batch.input_ids, mode=batch.mode, doc_ids=batch.doc_ids, compute_logits=False)
        labels = batch.extras["nsp_labels"]
        logits = model.nsp_logits(out.hidden, batch.extras["pair_ids"], batch.extras["sep_pos"])
        hits += int((logits.argmax(-1) == labels).sum())
        positives += int(labels.sum())
    return {"nsp_acc": hits / pairs, "pairs": pairs, "positive_share": positives / pairs, "seq_len": seq_len}


def masked_metrics(
    model: nn.Module,
    shards_dir: str | Path,
    tokenizer: Any = None,
    split: str = "val",
    seq_len: int | None = None,
    windows: int = 256,
    pairs: int = 512,
    rate: float = 0.15,
    next_token: bool = True,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """MLM and NSP accuracy of `model` (a `FlashLMForPretraining`) on a held-out shard split:
    {mlm_acc, nsp_acc, ...}."""
    stream = open_split(shards_dir, tokenizer, split)
    seq_len = min(seq_len or 128, model.cfg.max_seq_len)
    mlm = mlm_accuracy(model, stream, seq_len, windows, batch_size, rate, next_token, seed)
    nsp = nsp_accuracy(model, stream, seq_len, pairs, batch_size, seed)
    return {
        "mlm_acc": mlm["mlm_acc"],
        "nsp_acc": nsp["nsp_acc"],
        "mlm_loss": mlm["mlm_loss"],
        "unigram_acc": mlm["unigram_acc"],
        "masked_tokens": mlm["masked_tokens"],
        "pairs": pairs,
        "seq_len": seq_len,
        "next_token": next_token,
    }


# ---- fill-mask ------------------------------------------------------------------------------------
@torch.no_grad()
def fill_mask(
    model: nn.Module, tokenizer: Any, text: str, top_k: int = 5, next_token: bool = True, mask_token: str = "<mask>"
) -> list[list[tuple[str, float]]]:
    """The `top_k` (token text, probability) candidates for every `mask_token` in `text`, in order.

    A mask stands for one token, its leading space included ("on the <mask>." asks for " mat").
    With next-token prediction the candidates for the mask at position i are read at position i - 1
    (a <bos> is prepended when the text starts with the mask); otherwise at position i.
    """
    pieces = text.split(mask_token)
    if len(pieces) < 2:
        raise DataError(f'the text has no {mask_token}; write e.g. "The cat sat on the {mask_token}."')
    specials = SpecialTokens.from_tokenizer(tokenizer)
    ids: list[int] = []
    positions: list[int] = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        ids += tokenizer.encode(piece if last else piece.rstrip(" "))
        if not last:
            positions.append(len(ids))
            ids.append(specials.mask)
    if next_token and positions[0] == 0:
        ids, positions = [specials.bos, *ids], [p + 1 for p in positions]
    if len(ids) > model.cfg.max_seq_len:
        raise DataError(f"the text is {len(ids)} tokens, longer than the model's context ({model.cfg.max_seq_len})")
    model.eval()
    out = model(torch.tensor([ids], device=_device(model)), mode="bidirectional")
    read = [p - 1 if next_token else p for p in positions]
    logits = out.logits[0, read].float()
    logits[:, sorted(specials.ids)] = float("-inf")  # never propose a special token
    probs = logits.softmax(-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        [(tokenizer.decode([int(t)]), float(p)) for t, p in zip(ids_, ps, strict=True)]
        for ids_, ps in zip(top.indices.tolist(), top.values.tolist(), strict=True)
    ]

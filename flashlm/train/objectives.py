"""Training objectives: a batch maker plus a loss, registered by name.

An objective plugs into the loop as an `Objective(name, make_batch, loss)`:

- ``make_batch(stream, slot, train_cfg) -> Batch`` draws the micro-batch for a `BatchSlot`
  (a pure function of seed, step and rows, so runs resume exactly);
- ``loss(model, batch) -> (loss, metrics)`` runs the model and returns the scalar to minimise and a
  dict of detached scalar tensors to log (the loop averages them over micro-steps and ranks);
- ``frozen`` names parameter prefixes the objective never trains (left out of the optimizer, so
  DDP sees no unused parameters).

Only "clm" (causal LM) exists now; MLM, NSP, prefix LM and distillation register the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashlm.config import TrainConfig
from flashlm.data.batches import IGNORE_INDEX, Batch, BatchSlot, TokenStream, clm_batch
from flashlm.errors import ConfigError

Metrics = dict[str, torch.Tensor]
BatchFn = Callable[[TokenStream, BatchSlot, TrainConfig], Batch]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, Metrics]]


@dataclass(frozen=True)
class Objective:
    name: str
    make_batch: BatchFn
    loss: LossFn
    frozen: tuple[str, ...] = ("nsp_head",)


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add (or replace) an objective in the registry; returns it."""
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        known = ", ".join(OBJECTIVES)
        raise ConfigError(f"train.objective: unknown objective {name!r}; choose one of {known}")
    return OBJECTIVES[name]


def lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy in fp32; targets equal to IGNORE_INDEX carry no loss."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def forward(model: nn.Module, batch: Batch, **kwargs) -> torch.Tensor:
    """Logits of `model` on `batch` (its mode, documents and prefix)."""
    return model(batch.input_ids, mode=batch.mode, doc_ids=batch.doc_ids, prefix_len=batch.prefix_len,
                 **kwargs).logits


def clm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    """Mean next-token cross-entropy over the batch's targets; logs the loss and token accuracy."""
    logits = forward(model, batch)
    loss = lm_cross_entropy(logits, batch.targets)
    with torch.no_grad():
        valid = batch.targets != IGNORE_INDEX
        hits = (logits.argmax(-1) == batch.targets) & valid
        accuracy = hits.sum() / valid.sum().clamp(min=1)
    return loss, {"clm_loss": loss.detach(), "clm_acc": accuracy.float()}


def _clm_batch(stream: TokenStream, slot: BatchSlot, cfg: TrainConfig) -> Batch:
    return clm_batch(stream, slot, cfg.seq_len, cfg.packed_attention)


CLM = register(Objective("clm", _clm_batch, clm_loss))

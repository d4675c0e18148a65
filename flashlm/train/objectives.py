"""Training objectives: a batch maker plus a loss, registered by name.

An objective plugs into the loop as an `Objective(name, make_batch, loss)`:

- ``make_batch(stream, slot, train_cfg) -> Batch`` draws the micro-batch for a `BatchSlot`
  (a pure function of seed, step and rows, so runs resume exactly);
- ``loss(model, batch) -> (loss, metrics)`` runs the model and returns the scalar to minimise and a
  dict of detached scalar tensors to log (the loop averages them over micro-steps and ranks);
- ``frozen`` names parameter prefixes the objective never trains (left out of the optimizer, so
  DDP sees no unused parameters).

Registered: "clm" (causal LM), "mlm" (masked LM, loss on masked positions only), "nsp" (MLM +
next-sentence prediction on ``<bos> A <sep> B <eos>`` pairs) and "prefix_lm". `build_objective`
turns a TrainConfig into the run's objective: a registered one, or a **hybrid** that mixes the terms
of ``train.objectives`` step by step (see `flashlm.train.mixing`). Every step of a hybrid returns
the same metric keys (NaN for the terms it did not run), so each term is logged separately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashlm.config import TrainConfig
from flashlm.data.batches import (
    IGNORE_INDEX,
    Batch,
    BatchSlot,
    TokenStream,
    clm_batch,
    mlm_batch,
    nsp_batch,
    prefix_lm_batch,
)
from flashlm.data.masking import Masking
from flashlm.errors import ConfigError
from flashlm.train.mixing import MaskingSettings, Term, cycle, masking_settings, mix_terms, term_for_step

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


# ---- masked objectives ---------------------------------------------------------------------------
NAN = float("nan")


def unwrap(model: nn.Module) -> nn.Module:
    """The FlashLM inside DDP / torch.compile wrappers (for its heads)."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def masking_of(settings: MaskingSettings) -> Masking:
    return Masking(settings.rate, settings.mask_prob, settings.random_prob, settings.max_span)


def row_mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged within each row, then over rows (a row without targets adds 0).

    logits [N, V] are those of the `valid` positions of targets [B, T]. Rows weigh equally, so the loss of
    a batch is the mean of its rows' losses however the rows are split over ranks and micro-steps, even
    though rows hold different numbers of targets (masks, prefix splits).
    """
    per_token = F.cross_entropy(logits.float(), targets[valid], reduction="none")
    row = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[valid]
    sums = torch.zeros(targets.shape[0], device=per_token.device).index_add(0, row, per_token)
    return (sums / valid.sum(1).clamp(min=1)).mean()


def masked_loss(model: nn.Module, batch: Batch, nsp_weight: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """MLM cross-entropy on the masked positions only (+ nsp_weight × NSP cross-entropy on pairs).

    The LM head runs on the masked positions alone; rows weigh equally (`row_mean_cross_entropy`).
    Logs mlm_loss, mlm_acc (and nsp_loss, nsp_acc).
    """
    out = model(batch.input_ids, mode=batch.mode, doc_ids=batch.doc_ids, prefix_len=batch.prefix_len,
                compute_logits=False)
    net = unwrap(model)
    valid = batch.targets != IGNORE_INDEX
    logits = net.logits(out.hidden[valid])
    mlm = row_mean_cross_entropy(logits, batch.targets, valid)
    with torch.no_grad():
        count = int(valid.sum())
        hits = (logits.argmax(-1) == batch.targets[valid]).float().sum()
        mlm_acc = hits / count if count else torch.full_like(hits, NAN)
    metrics: Metrics = {"mlm_loss": mlm.detach() if count else torch.full_like(mlm, NAN), "mlm_acc": mlm_acc}
    labels = batch.extras.get("nsp_labels")
    if labels is None or nsp_weight <= 0:
        return mlm, metrics
    nsp_logits = net.nsp_logits(out.hidden, batch.extras.get("pair_ids"), batch.extras.get("sep_pos")).float()
    nsp = F.cross_entropy(nsp_logits, labels)
    with torch.no_grad():
        nsp_acc = (nsp_logits.argmax(-1) == labels).float().mean()
    return mlm + nsp_weight * nsp, {**metrics, "nsp_loss": nsp.detach(), "nsp_acc": nsp_acc}


def prefix_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    """Cross-entropy on the tokens after each prefix, rows weighing equally; logs prefix_lm_loss/_acc."""
    out = model(batch.input_ids, mode=batch.mode, doc_ids=batch.doc_ids, prefix_len=batch.prefix_len,
                compute_logits=False)
    valid = batch.targets != IGNORE_INDEX
    logits = unwrap(model).logits(out.hidden[valid])
    loss = row_mean_cross_entropy(logits, batch.targets, valid)
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == batch.targets[valid]).float().sum() / max(int(valid.sum()), 1)
    return loss, {"prefix_lm_loss": loss.detach(), "prefix_lm_acc": accuracy}


def make_term_batch(term: str, stream: TokenStream, slot: BatchSlot, cfg: TrainConfig,
                    nsp: bool = False) -> Batch:
    """The micro-batch of one term; masked terms read train.masking (rate schedule over train.steps)."""
    if term == "clm":
        return clm_batch(stream, slot, cfg.seq_len, cfg.packed_attention)
    if term == "prefix_lm":
        return prefix_lm_batch(stream, slot, cfg.seq_len, cfg.packed_attention)
    settings = masking_settings(cfg.masking)
    rate = settings.rate_at(slot.step, cfg.steps)
    if nsp:
        return nsp_batch(stream, slot, cfg.seq_len, masking_of(settings), settings.next_token, rate)
    return mlm_batch(stream, slot, cfg.seq_len, masking_of(settings), settings.next_token, rate,
                     settings.per_document)


def metric_keys(term: Term) -> tuple[str, ...]:
    if term.name in ("mlm", "nsp"):
        return ("mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc") if term.uses_nsp else ("mlm_loss", "mlm_acc")
    return (f"{term.name}_loss", f"{term.name}_acc")


def hybrid_objective(terms: list[Term]) -> Objective:
    """An objective that trains term `term_for_step(step)` at each step, weighted by its weight.

    Every step reports the union of the terms' metrics (NaN where a term did not run). When any term
    trains NSP, steps without it still touch the NSP head with a zero-weight term, so DDP sees every
    trainable parameter used at every step.
    """
    if not terms:
        raise ConfigError("train.objectives: no terms to mix; e.g. {clm: {ratio: 1}, mlm: {ratio: 3}}")
    order = cycle(terms)
    by_name = {t.name: t for t in terms}
    keys = tuple(dict.fromkeys(k for t in terms for k in metric_keys(t)))
    trains_nsp = any(t.uses_nsp for t in terms)

    def make_batch(stream: TokenStream, slot: BatchSlot, cfg: TrainConfig) -> Batch:
        term = by_name[term_for_step(slot.step, order)]
        batch = make_term_batch(term.name, stream, slot, cfg, nsp=term.uses_nsp)
        batch.extras["objective"] = term.name
        return batch

    def loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        term = by_name[batch.extras["objective"]]
        if term.name == "clm":
            value, metrics = clm_loss(model, batch)
        elif term.name == "prefix_lm":
            value, metrics = prefix_lm_loss(model, batch)
        else:
            value, metrics = masked_loss(model, batch, term.nsp_weight)
        value = term.weight * value
        if trains_nsp and "nsp_loss" not in metrics:  # a zero gradient for the NSP head
            head = unwrap(model).nsp_head
            value = value + 0.0 * (head.weight.sum() + head.bias.sum())
        nan = torch.full((), NAN, device=value.device)
        return value, {k: metrics.get(k, nan) for k in keys}

    frozen = () if trains_nsp else ("nsp_head",)
    return Objective("hybrid", make_batch, loss, frozen)


def build_objective(cfg: TrainConfig) -> Objective:
    """The run's objective: the hybrid of train.objectives when given, else train.objective."""
    terms = mix_terms(cfg.objectives)
    if terms:
        return hybrid_objective(terms)
    return get_objective(cfg.objective)


def _mlm_batch(stream: TokenStream, slot: BatchSlot, cfg: TrainConfig) -> Batch:
    return make_term_batch("mlm", stream, slot, cfg)


def _nsp_batch(stream: TokenStream, slot: BatchSlot, cfg: TrainConfig) -> Batch:
    return make_term_batch("nsp", stream, slot, cfg, nsp=True)


def _prefix_lm_batch(stream: TokenStream, slot: BatchSlot, cfg: TrainConfig) -> Batch:
    return make_term_batch("prefix_lm", stream, slot, cfg)


MLM = register(Objective("mlm", _mlm_batch, masked_loss))
NSP = register(Objective("nsp", _nsp_batch, lambda model, batch: masked_loss(model, batch, 1.0), frozen=()))
PREFIX_LM = register(Objective("prefix_lm", _prefix_lm_batch, prefix_lm_loss))

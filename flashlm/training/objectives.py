"""Training objectives: a batch maker plus a loss, registered by name.

An objective plugs into the loop as an `Objective(name, make_batch, loss)`:

- ``make_batch(stream, slot, train_cfg) -> Batch`` draws the micro-batch for a `BatchSlot`
  (a pure function of seed, step and rows, so runs resume exactly);
- ``loss(model, batch) -> (loss, metrics)`` runs the model and returns the scalar to minimise and a
  dict of detached scalar tensors to log (the loop averages them over micro-steps and ranks);
- ``frozen`` names parameter prefixes of the model the objective never trains (left out of the
  optimizer, so DDP sees no unused parameters).

A loss that is an `nn.Module` may own trainable heads: the NSP objectives' loss holds the `NSPHead`
(`flashlm.model.heads`), which the loop trains and checkpoints with the model; objectives without NSP
have no head at all.

Registered: "clm" (causal LM), "mlm" (masked LM, loss on masked positions only), "nsp" (MLM +
next-sentence prediction on ``<bos> A <sep> B <eos>`` pairs) and "prefix_lm". `build_objective`
turns a TrainConfig (and the model's config, which sizes the NSP head) into the run's objective: a
registered one (a fresh "nsp"), or a **hybrid** that mixes the terms of ``train.objectives`` step by
step (see `flashlm.training.mixing`). Every step of a hybrid returns the same metric keys (NaN for the
terms it did not run), so each term is logged separately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashlm.config import ModelConfig, TrainConfig
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
from flashlm.model.heads import NSPHead
from flashlm.training.mixing import MaskingSettings, Term, cycle, term_for_step

Metrics = dict[str, torch.Tensor]
BatchFn = Callable[[TokenStream, BatchSlot, TrainConfig], Batch]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, Metrics]]


@dataclass(frozen=True)
class Objective:
    name: str
    make_batch: BatchFn
    loss: LossFn
    frozen: tuple[str, ...] = ()


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
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def forward(model: nn.Module, batch: Batch, **kwargs) -> torch.Tensor:
    """Logits of `model` on `batch` (its mode, documents and prefix)."""
    return model(batch.input_ids, mode=batch.mode, doc_ids=batch.doc_ids, prefix_len=batch.prefix_len, **kwargs).logits


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


def masked_loss(
    model: nn.Module, batch: Batch, nsp_weight: float = 0.0, nsp_head: NSPHead | None = None
) -> tuple[torch.Tensor, Metrics]:
    """MLM cross-entropy on the masked positions only (+ nsp_weight × NSP cross-entropy on pairs, scored
    by `nsp_head`).

    The LM head runs on the masked positions alone; rows weigh equally (`row_mean_cross_entropy`).
    Logs mlm_loss, mlm_acc (and nsp_loss, nsp_acc).
    """
    out = model(
        batch.input_ids, mode=batch.mode, doc_ids=batch.doc_ids, prefix_len=batch.prefix_len, compute_logits=False
    )
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
    if nsp_head is None:
        raise ValueError("masked_loss: nsp_weight > 0 needs the NSP head (nsp_head=)")
    nsp_logits = nsp_head(model, out.hidden, batch.extras.get("pair_ids"), batch.extras.get("sep_pos")).float()
    nsp = F.cross_entropy(nsp_logits, labels)
    with torch.no_grad():
        nsp_acc = (nsp_logits.argmax(-1) == labels).float().mean()
    return mlm + nsp_weight * nsp, {**metrics, "nsp_loss": nsp.detach(), "nsp_acc": nsp_acc}


class NSPLoss(nn.Module):
    """The "nsp" objective's loss: masked LM + NSP on pairs, owning the trainable `NSPHead`."""

    def __init__(self, nsp_head: NSPHead, nsp_weight: float = 1.0) -> None:
        super().__init__()
        self.nsp_head = nsp_head
        self.nsp_weight = nsp_weight

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        return masked_loss(model, batch, self.nsp_weight, self.nsp_head)


def prefix_lm_loss(
    model: nn.Module, batch: Batch, label_smoothing: float = 0.0, rows_equal: bool = True
) -> tuple[torch.Tensor, Metrics]:
    """Cross-entropy on the tokens after each prefix, the LM head run on those tokens only; logs
    prefix_lm_loss/_acc. Rows weigh equally (the pre-training objective); with ``rows_equal=False`` tokens
    do, and labels may be smoothed (fine-tuning's loss, `flashlm.training.finetune.finetune`)."""
    if rows_equal and label_smoothing:
        raise ValueError("prefix_lm_loss: label_smoothing needs rows_equal=False")
    out = model(
        batch.input_ids, mode=batch.mode, doc_ids=batch.doc_ids, prefix_len=batch.prefix_len, compute_logits=False
    )
    valid = batch.targets != IGNORE_INDEX
    logits = unwrap(model).logits(out.hidden[valid])
    if rows_equal:
        loss = row_mean_cross_entropy(logits, batch.targets, valid)
    else:
        loss = F.cross_entropy(logits.float(), batch.targets[valid], label_smoothing=label_smoothing)
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == batch.targets[valid]).float().sum() / max(int(valid.sum()), 1)
    return loss, {"prefix_lm_loss": loss.detach(), "prefix_lm_acc": accuracy}


def make_term_batch(term: str, stream: TokenStream, slot: BatchSlot, cfg: TrainConfig, nsp: bool = False) -> Batch:
    """The micro-batch of one term; masked terms read train.masking (rate schedule over train.steps)."""
    if term == "clm":
        return clm_batch(stream, slot, cfg.seq_len, cfg.packed_attention)
    if term == "prefix_lm":
        return prefix_lm_batch(stream, slot, cfg.seq_len, cfg.packed_attention)
    settings = cfg.masking
    rate = settings.rate_at(slot.step, cfg.steps)
    if nsp:
        return nsp_batch(stream, slot, cfg.seq_len, masking_of(settings), settings.next_token, rate)
    return mlm_batch(stream, slot, cfg.seq_len, masking_of(settings), settings.next_token, rate, settings.per_document)


def metric_keys(term: Term) -> tuple[str, ...]:
    if term.name in ("mlm", "nsp"):
        return ("mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc") if term.uses_nsp else ("mlm_loss", "mlm_acc")
    return (f"{term.name}_loss", f"{term.name}_acc")


class HybridLoss(nn.Module):
    """The loss of a hybrid: term `batch.extras["objective"]`, weighted, with every term's metric keys
    (NaN where a term did not run). Owns the `NSPHead` when a term trains NSP."""

    def __init__(self, terms: list[Term], nsp_head: NSPHead | None = None) -> None:
        super().__init__()
        self.by_name = {t.name: t for t in terms}
        self.keys = tuple(dict.fromkeys(k for t in terms for k in metric_keys(t)))
        self.nsp_head = nsp_head

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        term = self.by_name[batch.extras["objective"]]
        if term.name == "clm":
            value, metrics = clm_loss(model, batch)
        elif term.name == "prefix_lm":
            value, metrics = prefix_lm_loss(model, batch)
        else:
            value, metrics = masked_loss(model, batch, term.nsp_weight, self.nsp_head)
        value = term.weight * value
        nan = torch.full((), NAN, device=value.device)
        return value, {k: metrics.get(k, nan) for k in self.keys}


def new_nsp_head(model_cfg: ModelConfig | None, seed: int) -> NSPHead:
    if model_cfg is None:
        raise ConfigError("train.objective: NSP needs the model config to size its head; pass model_cfg")
    return NSPHead.as_drawn_by_flashlm(model_cfg, seed)


def hybrid_objective(terms: list[Term], model_cfg: ModelConfig | None = None, seed: int = 0) -> Objective:
    """An objective that trains term `term_for_step(step)` at each step, weighted by its weight.

    Every step reports the union of the terms' metrics (NaN where a term did not run). When a term trains
    NSP the loss owns a fresh `NSPHead` (`NSPHead.as_drawn_by_flashlm(model_cfg, seed)`), trained on the
    NSP steps (the loop gives it a zero gradient on the others, as DDP does the model's parameters).
    """
    if not terms:
        raise ConfigError("train.objectives: no terms to mix; e.g. {clm: {ratio: 1}, mlm: {ratio: 3}}")
    order = cycle(terms)
    by_name = {t.name: t for t in terms}
    head = new_nsp_head(model_cfg, seed) if any(t.uses_nsp for t in terms) else None

    def make_batch(stream: TokenStream, slot: BatchSlot, cfg: TrainConfig) -> Batch:
        term = by_name[term_for_step(slot.step, order)]
        batch = make_term_batch(term.name, stream, slot, cfg, nsp=term.uses_nsp)
        batch.extras["objective"] = term.name
        return batch

    return Objective("hybrid", make_batch, HybridLoss(terms, head))


def nsp_objective(model_cfg: ModelConfig | None = None, seed: int = 0) -> Objective:
    """The "nsp" objective with a fresh head of its own (`NSPHead.as_drawn_by_flashlm(model_cfg, seed)`)."""
    return Objective("nsp", _nsp_batch, NSPLoss(new_nsp_head(model_cfg, seed)))


def build_objective(cfg: TrainConfig, model_cfg: ModelConfig | None = None) -> Objective:
    """The run's objective: the hybrid of train.objectives when given, else train.objective. Objectives
    that train NSP get a fresh `NSPHead` (`model_cfg` sizes it; train.seed initialises it)."""
    terms = list(cfg.objectives.values())
    if terms:
        return hybrid_objective(terms, model_cfg, cfg.seed)
    if cfg.objective == "nsp":
        return nsp_objective(model_cfg, cfg.seed)
    return get_objective(cfg.objective)


def _mlm_batch(stream: TokenStream, slot: BatchSlot, cfg: TrainConfig) -> Batch:
    return make_term_batch("mlm", stream, slot, cfg)


def _nsp_batch(stream: TokenStream, slot: BatchSlot, cfg: TrainConfig) -> Batch:
    return make_term_batch("nsp", stream, slot, cfg, nsp=True)


def _prefix_lm_batch(stream: TokenStream, slot: BatchSlot, cfg: TrainConfig) -> Batch:
    return make_term_batch("prefix_lm", stream, slot, cfg)


MLM = register(Objective("mlm", _mlm_batch, masked_loss))


def _nsp_needs_a_head(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    raise ConfigError(
        "train.objective: nsp owns a trainable NSP head; build it with build_objective(train_cfg, "
        "model_cfg) or nsp_objective(model_cfg)"
    )


# "nsp" owns a trainable head, so each run builds its own (`nsp_objective`, which `build_objective` calls);
# the registry's entry only names it.
NSP = register(Objective("nsp", _nsp_batch, _nsp_needs_a_head))
PREFIX_LM = register(Objective("prefix_lm", _prefix_lm_batch, prefix_lm_loss))

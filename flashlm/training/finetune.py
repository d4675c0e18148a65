"""Supervised fine-tuning on in-memory examples (bAbI, translation, span QA).

A prefix-LM example is ``<bos> source <sep> target <eos>``: the source (and its framing) attends
bidirectionally (``mode="prefix"``, ``prefix_len = len(bos + source + sep)``), the target causally,
and only the target tokens and the closing ``<eos>`` carry loss. Rows are padded on the right; the
padding sits in its own document (``doc_ids``), so no real token ever attends to it, and its
targets are ignored.

`fit` is the loop itself, shared with other heads (the SQuAD span head): deterministic shuffling by
seed (with optional length bucketing, which cuts padding), and from `flashlm.training.optim` (what the
pre-training loop uses too) the optimizer (AdamW, or Muon with AdamW), the cosine, autocast and the update
(clip, step, zero); the progress bar is `flashlm.training.progress`'s. It has both a step and a time
budget: `FitSchedule` warms up over steps, and its cosine follows the share of the run done, steps
or time, whichever is further along, so a run cut short by the clock still ends decayed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from flashlm.config import ModelConfig, get_preset, replace
from flashlm.data.batches import IGNORE_INDEX, Batch
from flashlm.model.transformer import FlashLM
from flashlm.training.finetune_config import FinetuneConfig
from flashlm.training.objectives import prefix_lm_loss
from flashlm.training.optim import apply_update, autocast_for, cosine, make_optimizer, seed_everything, set_lr
from flashlm.training.progress import progress_bar

LossFn = Callable[[nn.Module, Any], torch.Tensor]
COSINE_RESOLUTION = 10_000  # FitSchedule reads the cosine at the share of the run done, rounded to 1/this


class Example(NamedTuple):
    """One framed prefix-LM sequence: ``ids`` = bos + source + sep + target + eos."""

    ids: list[int]
    prefix_len: int  # len(bos + source + sep): the bidirectional part


@dataclass(frozen=True)
class FitSchedule:
    """`fit`'s learning rate over a run of its real length: for step `step` (0-based), a linear warmup over
    `warmup` steps (at most a tenth of the run), times a cosine from 1 to `floor` over `progress`, the share
    of the run done (of its steps, or of its time budget when the clock runs ahead; `_Run.progress`).

    The cosine is read at that share rounded to 1/`COSINE_RESOLUTION`: the recorded fine-tuning figures
    were made with that rounding, and keeping it keeps them reproducible bit for bit."""

    lr: float
    floor: float
    warmup: int

    @classmethod
    def of(cls, cfg: FinetuneConfig, total: int) -> FitSchedule:
        """The schedule of a run of `total` steps."""
        return cls(cfg.lr, cfg.min_lr_ratio, min(cfg.warmup_steps, max(total // 10, 1)))

    def __call__(self, step: int, progress: float) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        return self.lr * warm * cosine(round(progress * COSINE_RESOLUTION) / COSINE_RESOLUTION, self.floor)


# ---- examples -----------------------------------------------------------------------------------
def make_example(
    tokenizer: Any, source: str | Sequence[int], target: str | Sequence[int], max_len: int | None = None
) -> Example:
    """Frame one (source, target) pair; texts are encoded, id lists used as they are.

    When ``max_len`` is given, the source loses tokens from its start until the sequence fits.
    """
    src = tokenizer.encode(source) if isinstance(source, str) else list(source)
    tgt = tokenizer.encode(target) if isinstance(target, str) else list(target)
    if max_len is not None:
        room = max_len - len(tgt) - 3
        if room < 1:
            raise ValueError(f"a target of {len(tgt)} tokens leaves no room for a source in {max_len}")
        src = src[-room:]
    ids = [tokenizer.bos_id, *src, tokenizer.sep_id, *tgt, tokenizer.eos_id]
    return Example(ids, len(src) + 2)


def collate_prefix(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """Right-padded prefix-LM batch; targets outside the target span + eos are ignored."""
    width = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.ones((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        ids = torch.tensor(ex.ids, dtype=torch.long)
        n = len(ex.ids) - 1
        inputs[row, :n] = ids[:-1]
        doc_ids[row, :n] = 0
        first = ex.prefix_len - 1  # the <sep> position predicts the first target token
        targets[row, first:n] = ids[first + 1 :]
    prefix_len = torch.tensor([e.prefix_len for e in examples], dtype=torch.long)
    return Batch(inputs, targets, "prefix", doc_ids, prefix_len)


# ---- batching -----------------------------------------------------------------------------------
def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket: int = 0) -> list[np.ndarray]:
    """Index batches of one epoch, a pure function of (seed, epoch).

    With ``bucket > 1`` the shuffled indices are sorted by length inside groups of ``bucket``
    batches, then the batches are shuffled again: rows of a batch have similar lengths.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if bucket > 1:
        lens = np.asarray(lengths)
        group = batch_size * bucket
        order = np.concatenate(
            [
                chunk[np.argsort(lens[chunk], kind="stable")]
                for chunk in np.split(order, range(group, len(order), group))
            ]
        )
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))] if bucket > 1 else batches


def _batch_stream(lengths: Sequence[int], cfg: FinetuneConfig) -> Iterable[np.ndarray]:
    epoch = 0
    while True:
        yield from epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.bucket)
        epoch += 1


# ---- the loop -----------------------------------------------------------------------------------
def fit(
    module: nn.Module,
    items: Sequence[Any],
    collate: Callable[[Sequence[Any]], Any],
    loss_fn: LossFn,
    cfg: FinetuneConfig,
    lengths: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Train ``module`` on ``items`` (batched by ``collate``, scored by ``loss_fn``); return metrics.

    ``lengths`` (tokens per item) enables length bucketing and the tokens/s figure.
    """
    if not items:
        raise ValueError("fine-tuning needs at least one example")
    cfg.validate()
    lengths = list(lengths) if lengths is not None else [1] * len(items)
    per_epoch = math.ceil(len(items) / cfg.batch_size)
    total = math.ceil(cfg.epochs * per_epoch)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    schedule = FitSchedule.of(cfg, total)
    seed_everything(cfg.seed)
    device = next(module.parameters()).device
    optimizer = make_optimizer(module, cfg, device)
    amp = autocast_for(cfg.precision, device)
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    state = _Run(total=total, budget=budget, clock=cfg.clock)
    module.train()
    with _progress(cfg.progress) as bar:
        for step, rows in enumerate(_batch_stream(lengths, cfg)):
            if step >= total or state.out_of_time() or state.converged(cfg.stop_loss, cfg.stop_windows):
                break
            set_lr(optimizer, schedule(step, state.progress(step)))
            batch = collate([items[i] for i in rows])
            loss = _train_step(module, optimizer, loss_fn, _to(batch, device), cfg.grad_clip, amp)
            state.record(step, loss, sum(lengths[i] for i in rows), cfg.log_every)
            bar(state)
    module.eval()
    return state.summary(per_epoch)


def finetune(
    model: FlashLM,
    examples: Sequence[Any],
    cfg: FinetuneConfig,
    collate: Callable[[Sequence[Any]], Batch] | None = None,
    lengths: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Prefix-LM fine-tuning of ``model`` on framed examples (see `make_example`), or on any items that
    ``collate`` turns into prefix-LM batches (then ``lengths`` gives their tokens, for bucketing)."""
    loss = lambda m, b: prefix_lm_loss(m, b, cfg.label_smoothing, rows_equal=False)[0]
    if collate is None:
        collate, lengths = collate_prefix, [len(e.ids) for e in examples]
    return fit(model, examples, collate, loss, cfg, lengths)


def _train_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    batch: Any,
    grad_clip: float,
    amp: Callable[[], AbstractContextManager],
) -> float:
    with amp():
        loss = loss_fn(module, batch)
    loss.backward()
    apply_update(module, optimizer, grad_clip)
    return float(loss.detach())


def _to(batch: Any, device: torch.device) -> Any:
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


@dataclass
class _Run:
    """Step and clock bookkeeping of one `fit` call."""

    total: int
    budget: float | None
    clock: str = "wall"
    start: float = 0.0
    cpu_start: float = 0.0
    steps: int = 0
    tokens: int = 0
    window: float = 0.0
    window_n: int = 0
    first_loss: float | None = None
    last_loss: float | None = None

    def __post_init__(self) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.history: list[tuple[int, float]] = []

    def elapsed(self) -> float:
        """Seconds on the budget's clock: wall time, or this process's CPU time (all threads)."""
        if self.clock == "cpu":
            return time.process_time() - self.cpu_start
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.budget is not None and self.elapsed() >= self.budget

    def converged(self, stop_loss: float | None, windows: int) -> bool:
        """The last ``windows`` logged losses are all below ``stop_loss``."""
        recent = self.history[-windows:]
        return stop_loss is not None and len(recent) == windows and all(loss < stop_loss for _, loss in recent)

    def progress(self, step: int) -> float:
        """Share of the run done: of the steps, or of the time budget when the clock runs ahead."""
        done = step / max(self.total, 1)
        if self.budget is not None:
            done = max(done, self.elapsed() / self.budget)
        return min(done, 1.0)

    def record(self, step: int, loss: float, tokens: int, log_every: int) -> None:
        self.steps, self.tokens = step + 1, self.tokens + tokens
        self.window, self.window_n = self.window + loss, self.window_n + 1
        if self.window_n >= log_every or self.steps == self.total:
            self._flush()

    def summary(self, per_epoch: int) -> dict[str, Any]:
        if self.window_n:  # a partial window left by the clock
            self._flush()
        seconds = time.perf_counter() - self.start
        return {
            "steps": self.steps,
            "epochs": self.steps / per_epoch,
            "seconds": seconds,
            "cpu_seconds": time.process_time() - self.cpu_start,
            "first_loss": self.first_loss,
            "final_loss": self.last_loss,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / max(seconds, 1e-9),
            "history": self.history,
        }

    def _flush(self) -> None:
        mean = self.window / self.window_n
        self.history.append((self.steps, mean))
        self.first_loss = mean if self.first_loss is None else self.first_loss
        self.last_loss, self.window, self.window_n = mean, 0.0, 0


class _progress:
    """A rich progress bar (stderr) over the share of the run done (steps or clock), as a context
    manager yielding an update function; or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar, self.task = enabled, None, None

    def __enter__(self) -> Callable[[_Run], None]:
        if not self.enabled:
            return lambda state: None
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.bar = progress_bar(
            TextColumn("[bold]fine-tune"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("step {task.fields[step]}  loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        )
        self.task = self.bar.add_task("fine-tune", total=1.0, loss="-", step=0)
        self.bar.start()
        return self._update

    def _update(self, state: _Run) -> None:
        loss = f"{state.last_loss:.4f}" if state.last_loss is not None else "-"
        self.bar.update(self.task, completed=state.progress(state.steps), loss=loss, step=state.steps)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---- decoding -----------------------------------------------------------------------------------
def prompt_ids(tokenizer: Any, source: str, limit: int, keep: str = "start") -> list[int]:
    """``<bos> source <sep>``, the source cut to ``limit`` tokens keeping its "start" or its "end"."""
    ids = tokenizer.encode(source)
    ids = ids[:limit] if keep == "start" else ids[max(len(ids) - limit, 0) :]
    return [tokenizer.bos_id, *ids, tokenizer.sep_id]


# ---- models from scratch ------------------------------------------------------------------------
def new_model(
    texts: Iterable[str],
    model: ModelConfig | str,
    vocab_size: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **changes: Any,
) -> tuple[FlashLM, Any]:
    """A tokenizer trained on ``texts`` and a fresh FlashLM sized to it (a preset name or a config;
    ``changes`` override config fields, e.g. ``layer_pattern="G"``)."""
    from flashlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(iter(texts), vocab_size=vocab_size, show_progress=False)
    cfg = get_preset(model) if isinstance(model, str) else model
    cfg = replace(cfg, vocab_size=tokenizer.vocab_size, **changes)
    seed_everything(seed)
    return FlashLM(cfg).to(device), tokenizer


__all__ = [
    "Example",
    "FinetuneConfig",
    "FitSchedule",
    "collate_prefix",
    "epoch_batches",
    "finetune",
    "fit",
    "make_example",
    "new_model",
    "prompt_ids",
]

"""The training loop: one plain function, `train(cfg)`, over plain parts.

Parts: the model (wrapped in DDP or sharded with FSDP2 when launched by torchrun), AdamW and its
LambdaLR schedule (`flashlm.training.optim`, shared with fine-tuning), the token streams
(`flashlm.training.rundata`), an `Objective` (batch maker + loss) and a small run log
(`flashlm.training.runlog`).

- **The objective** is given, never built around a teacher here: distillation is an objective
  (`flashlm.training.distill.distill_objective`), which `flashlm.training.train` builds for a run with a
  ``distill:`` section. An objective that needs the run's data or device is passed as a factory,
  ``objective(data, env) -> Objective``, called once the data is open.
- **Batches** are a pure function of the step (see `flashlm.data.batches`), so resuming restores
  weights, optimizer, schedule and RNG and simply continues at the next step: the losses match an
  uninterrupted run bit for bit on CPU.
- **Distributed**: each rank draws its own rows of the step's global batch; gradients are averaged
  by DDP (``no_sync`` on non-final micro-steps) or FSDP2; rank 0 alone writes logs and checkpoints.
- **Micro-batches** weigh equally: the step loss is the mean of the micro-batch mean losses.
- **Signals**: SIGINT / SIGTERM finish the step in progress, save a checkpoint and return with
  ``stopped_by`` in the summary (`flashlm.training.stopping`; all ranks agree on the step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flashlm.config import RunConfig, TrainConfig, canonical_train_settings
from flashlm.data.batches import IGNORE_INDEX, BatchSlot, TokenStream, eval_batches
from flashlm.errors import CheckpointError, ConfigError
from flashlm.hardware import dtype_of, matmul_peak_flops, resolve_precision
from flashlm.model.flops import training_flops_per_token
from flashlm.model.transformer import FlashLM
from flashlm.training.checkpoint import (
    CHECKPOINTS_DIR,
    capture_rng,
    latest_checkpoint,
    link_latest,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from flashlm.training.distributed import DistEnv, mean_across_ranks, setup_distributed, teardown
from flashlm.training.objectives import Metrics, Objective, build_objective, forward, lm_cross_entropy
from flashlm.training.optim import (
    Clock,
    apply_update,
    autocast_for,
    build_optimizer,
    build_scheduler,
    seed_everything,
)
from flashlm.training.rundata import Data, open_data
from flashlm.training.runlog import RUN_CONFIG_FILE, RunLog
from flashlm.training.stopping import StopSignals, signal_name

__all__ = [
    "ObjectiveFactory",
    "Parts",
    "build_model",
    "evaluate",
    "materialize_shards",
    "peak_flops",
    "resume",
    "save",
    "train",
    "train_step",
]

ObjectiveFactory = Callable[[Data, DistEnv], Objective]


# ---- model and optimizer -------------------------------------------------------------------------
@dataclass
class Parts:
    """The model three ways: the FlashLM itself, the module holding the state (DDP or the model)
    and what the loop calls (possibly compiled)."""

    model: FlashLM
    stateful: nn.Module
    forward: nn.Module
    fsdp: bool = False
    extra: nn.Module | None = None  # an objective's own trainable module (a distillation projection)

    @property
    def trained(self) -> nn.Module:
        """What the optimizer (and its state dict) covers: the model, plus `extra` when there is one."""
        if self.extra is None:
            return self.stateful
        return nn.ModuleDict({"model": self.stateful, "objective": self.extra})


def build_model(cfg: RunConfig, env: DistEnv, objective: Objective) -> Parts:
    """FlashLM on the device (same seed, hence same weights, on every rank), frozen heads, wrapped."""
    tcfg = cfg.train
    seed_everything(tcfg.seed)
    init = getattr(objective.loss, "init_student", None)  # distillation: student_init from the teacher
    fsdp = env.enabled and tcfg.distributed == "fsdp"
    on_meta = fsdp and init is None  # FSDP2: no rank ever holds the whole model
    with torch.device("meta") if on_meta else nullcontext():
        model = FlashLM(cfg.model)
    if not on_meta:
        model = model.to(env.device)
    if init is not None:
        init(model)
    for name, param in model.named_parameters():
        if name.startswith(objective.frozen):
            param.requires_grad_(False)
    model.gradient_checkpointing = tcfg.activation_checkpointing
    stateful: nn.Module = model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        if on_meta:
            seed_everything(tcfg.seed)
            materialize_shards(model, env.device)
    elif env.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        stateful = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    run = torch.compile(stateful) if tcfg.compile else stateful
    return Parts(model, stateful, run, fsdp)


def materialize_shards(model: FlashLM, device: torch.device) -> None:
    """Allocate a meta-device model sharded by FSDP2 on `device` and initialise it: each parameter is
    drawn whole, in `reset_parameters` order (so every rank, and an unsharded model from the same seed,
    draws the same values), and each rank keeps only its shard. Peak memory: one full parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = torch.empty(param.shape, dtype=param.dtype)
            model.init_parameter_(name, full)
            if isinstance(param, DTensor):  # every rank drew the same values: no communication needed
                full = distribute_tensor(full.to(device), param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(full)


# ---- one step ------------------------------------------------------------------------------------
@contextmanager
def grad_sync(parts: Parts, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on non-final micro-steps (DDP no_sync / FSDP2 flag)."""
    if parts.fsdp:
        parts.model.set_requires_gradient_sync(sync)
        yield
    elif sync or not hasattr(parts.stateful, "no_sync"):
        yield
    else:
        with parts.stateful.no_sync():
            yield


def train_step(
    parts: Parts,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    objective: Objective,
    data: Data,
    tcfg: TrainConfig,
    env: DistEnv,
    step: int,
    amp: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, Metrics, torch.Tensor]:
    """One optimizer update over grad_accum micro-batches: (mean loss, mean metrics, grad norm)."""
    parts.forward.train()
    accum = tcfg.grad_accum
    total = torch.zeros((), device=env.device)
    sums: Metrics = {}
    for micro in range(accum):
        slot = BatchSlot(tcfg.seed, step, tcfg.batch_size, env.rank, env.world, micro, accum)
        batch = objective.make_batch(data.train, slot, tcfg).to(env.device)
        with grad_sync(parts, micro == accum - 1):
            with amp():
                loss, metrics = objective.loss(parts.forward, batch)
            (loss / accum).backward()
        total += loss.detach() / accum
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0) + value.detach().float() / accum
    if parts.extra is not None:  # the objective's parameters (NSP head, projection) step every update,
        for param in parts.extra.parameters():  # as the model's do: a zero gradient where a step left them out
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
            if param.grad is not None and env.enabled:  # DDP averages the model's gradients only
                param.grad.copy_(mean_across_ranks(param.grad, env))
    grad_norm = apply_update(
        parts.model if parts.extra is None else parts.trained, optimizer, tcfg.grad_clip, scheduler
    )
    return total, sums, grad_norm


# ---- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    parts: Parts,
    val: TokenStream,
    tcfg: TrainConfig,
    env: DistEnv,
    amp: Callable[[], AbstractContextManager],
    bytes_per_tok: float | None = None,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte on fixed validation windows.

    eval_batches global batches (batch_size × world windows each), so the windows, hence the
    numbers, do not depend on how many ranks share them.
    """
    parts.forward.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)  # nats, target tokens
    count = tcfg.eval_batches * tcfg.batch_size * env.world
    for batch in eval_batches(val, tcfg.seq_len, tcfg.batch_size, count, env.rank, env.world, tcfg.packed_attention):
        batch = batch.to(env.device)
        with amp():
            logits = forward(parts.forward, batch)
        totals[0] += lm_cross_entropy(logits, batch.targets, reduction="sum").double()
        totals[1] += (batch.targets != IGNORE_INDEX).sum()
    parts.forward.train()
    if env.enabled:
        dist.all_reduce(totals)
    nats, tokens = totals.tolist()
    loss = nats / max(tokens, 1.0)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(tokens)}
    if bytes_per_tok:
        out["val_bpb"] = loss / (math.log(2) * bytes_per_tok)
    return out


# ---- checkpoints ---------------------------------------------------------------------------------
def save(
    parts: Parts,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: RunConfig,
    env: DistEnv,
    step: int,
    data: Data,
    clock: Clock,
) -> Path | None:
    """Gather full states (a collective under FSDP) and let rank 0 write the checkpoint."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(parts.stateful, options=options)
    optim_state = get_optimizer_state_dict(parts.trained, optimizer, options=options)
    path = None
    if env.is_main:
        state = {
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng(),
            "config": cfg.to_dict(),
            "world_size": env.world,
            "train_seconds": clock.spent(),
        }
        if parts.extra is not None:  # the objective's own weights (e.g. a distillation projection)
            state["objective"] = {k: v.detach().cpu() for k, v in parts.extra.state_dict().items()}
        path = save_checkpoint(
            Path(cfg.train.out) / CHECKPOINTS_DIR,
            step,
            model_state,
            cfg.model,
            state,
            data.tokenizer_file,
            cfg.train.keep_last,
        )
        link_latest(Path(cfg.train.out), path)
    env.barrier()
    return path


def resume(
    parts: Parts, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: RunConfig, env: DistEnv, clock: Clock
) -> tuple[int, Path | None, dict[str, Any]]:
    """Load the checkpoint train.resume names (if any) into every part, and its time into `clock`.

    Returns (step, checkpoint path, the checkpoint's train settings); (0, None, {}) for a fresh start.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = resolve_resume(cfg.train.resume, cfg.train.out)
    if path is None:
        _refuse_to_mix_runs(Path(cfg.train.out))
        return 0, None, {}
    model_state, state = load_checkpoint(path, cfg.model)
    options = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(parts.stateful, model_state, options=options)
        set_optimizer_state_dict(parts.trained, optimizer, optim_state_dict=state["optimizer"], options=options)
        if parts.extra is not None:
            parts.extra.load_state_dict(state["objective"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        clock.spent_before = float(state.get("train_seconds", 0.0))
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{path}: its training state does not fit this run ({reason})") from None
    return int(state["step"]), path, dict(state["config"].get("train") or {})


def _refuse_to_mix_runs(out: Path) -> None:
    """A fresh run must not write into a folder holding another run's checkpoints (pruning and
    `latest` would mix them), nor into a non-empty folder that is not a run (its metrics.jsonl, plot
    and config would be overwritten). A run folder is known by its config.yaml, written first."""
    if out.is_dir() and not (out / RUN_CONFIG_FILE).is_file() and any(out.iterdir()):
        raise ConfigError(
            f"train.out: {out} is not empty and holds no FlashLM run; choose an empty or new folder for train.out"
        )
    found = latest_checkpoint(out / CHECKPOINTS_DIR)
    if found is not None:
        raise ConfigError(
            f"train.out: {out} already holds checkpoints (latest {found.name}); resume with "
            "--resume (train.resume=true) or choose another train.out"
        )


def changed_settings(saved: dict[str, Any], tcfg: TrainConfig) -> list[str]:
    """Train settings that differ from the checkpoint's and change which batches a step sees."""
    keys = (
        "seed",
        "batch_size",
        "seq_len",
        "grad_accum",
        "objective",
        "objectives",
        "masking",
        "packed_attention",
        "data",
    )
    saved, current = canonical_train_settings(saved), tcfg.to_dict()  # typed masking/objectives as mappings
    return [k for k in keys if saved.get(k) != current.get(k)]


# ---- the loop ------------------------------------------------------------------------------------
StepCallback = Callable[[int, dict[str, Any]], Any]


def train(
    cfg: RunConfig,
    callback: StepCallback | None = None,
    objective: Objective | ObjectiveFactory | None = None,
    stop_on_signals: bool = False,
) -> dict[str, Any]:
    """Pre-train `cfg.model` on `cfg.train.data`; returns a summary (step reached, last loss, last
    eval, per-row history, output and checkpoint paths).

    Works alone or under ``torchrun`` (DDP, or FSDP2 with ``train.distributed: fsdp``).
    `callback(step, row)` runs after every step on every rank (`row`: what was logged, maybe empty);
    a true return value saves a checkpoint and stops, e.g. for a time budget (return the same
    value on every rank). With `stop_on_signals` (the CLI's `train` and `distill`), SIGINT / SIGTERM do the
    same after the step in progress (from the main thread); the summary's ``stopped_by`` then names the
    signal (else None). Without it they keep their usual effect, e.g. for a demo running several stages.
    `objective` replaces the registry's ``train.objective``: an `Objective`,
    or a factory ``objective(data, env)`` called once the data is open (e.g. one loading a teacher).
    A run with a ``distill:`` section needs the distillation objective: `flashlm.training.train` builds
    it (`flashlm.training.distill.distill_objective`); this loop never builds a teacher.
    """
    cfg.validate()
    objective = objective or build_objective(cfg.train, cfg.model)
    env = setup_distributed(cfg.train.device)
    try:
        return _run(cfg, objective, env, callback, StopSignals(stop_on_signals))
    finally:
        teardown(env)


def _run(
    cfg: RunConfig,
    objective: Objective | ObjectiveFactory,
    env: DistEnv,
    callback: StepCallback | None,
    signals: StopSignals,
) -> dict[str, Any]:
    tcfg = cfg.train
    data = open_data(tcfg, cfg.model.vocab_size)
    if not isinstance(objective, Objective):
        objective = objective(data, env)
    if cfg.distill is not None and objective.name != "distill":
        raise ConfigError(
            f"distill: the run has a distill: section but trains {objective.name!r}; run it with "
            "flashlm.training.train (`flashlm distill`), which builds the distillation objective"
        )
    parts = build_model(cfg, env, objective)
    parts.extra = _place_objective(objective, env, tcfg)
    optimizer = build_optimizer(parts.trained, tcfg, env.device)
    clock = Clock(budget=tcfg.minutes * 60)
    scheduler = build_scheduler(optimizer, tcfg, clock)
    start, resumed_from, saved = resume(parts, optimizer, scheduler, cfg, env, clock)
    log = RunLog(cfg, env.is_main, start)
    _announce(log, tcfg, data, start, resumed_from, saved)
    amp = autocast_for(tcfg.precision, env.device)
    peak, source = peak_flops(tcfg, env.device)
    flops = training_flops_per_token(cfg.model, tcfg.seq_len)
    log.print(
        f"MFU against {peak / 1e9:,.1f} GFLOP/s per device ({source}); {flops / 1e6:,.2f} MFLOP per trained token"
    )
    state = _LoopState(start, resumed_from, clock, flops_per_token=flops, peak_flops=peak, peak_source=source)
    stopped_by = 0
    clock.start()
    with closing(log), signals:
        for step in range(start + 1, tcfg.steps + 1):
            lr = optimizer.param_groups[0]["lr"]
            loss, metrics, grad_norm = train_step(parts, optimizer, scheduler, objective, data, tcfg, env, step, amp)
            state.record(loss, metrics)
            state.step = step
            out_of_time = clock.sync(env)
            last = out_of_time or step == tcfg.steps
            row = _maybe_log(state, step, grad_norm, list(metrics), tcfg, env, lr, last)
            row.update(_maybe_eval(state, step, parts, data, tcfg, env, amp, last))
            if row:
                row["train_seconds"] = clock.spent()
                state.history.append(row)
                log.write(row)
            log.advance(row)
            stopped_by = signals.agreed(env)  # every rank, every step: all stop after the same one
            stop = (bool(callback(step, row)) if callback is not None else False) or out_of_time or bool(stopped_by)
            if stop or _due(step, tcfg.save_every, last):
                save_now = lambda s=step: save(parts, optimizer, scheduler, cfg, env, s, data, clock)
                state.checkpoint = _timed(state, save_now)
            if stop:
                break
    stopped = {"stopped_by": signal_name(stopped_by) if stopped_by else None, "signal": stopped_by}
    return {**state.summary(env), "out": str(tcfg.out), **stopped}


def peak_flops(tcfg: TrainConfig, device: torch.device) -> tuple[float, str]:
    """The FLOP/s that MFU divides by, and where it came from: train.peak_flops when set, else a square
    matmul timed on the training device in the run's precision."""
    if tcfg.peak_flops:
        return float(tcfg.peak_flops), "train.peak_flops"
    precision = resolve_precision(tcfg.precision, device)
    n = 1024
    measured = matmul_peak_flops(device, dtype_of(precision), n)
    return measured, f"measured: {precision} {n}x{n} matmul on {device.type}, median of 5"


def _place_objective(objective: Objective, env: DistEnv, tcfg: TrainConfig) -> nn.Module | None:
    """Move a loss that is a module (e.g. holding a teacher) to the device; return it when it has
    trainable parameters of its own (the loop then trains them with the model's and keeps them, and
    their optimizer state, in every checkpoint)."""
    if not isinstance(objective.loss, nn.Module):
        return None
    objective.loss.to(env.device)
    if not any(p.requires_grad for p in objective.loss.parameters()):
        return None
    return objective.loss


def _due(step: int, every: int, last: bool) -> bool:
    return step % every == 0 or last


def _announce(
    log: RunLog, tcfg: TrainConfig, data: Data, start: int, resumed_from: Path | None, saved: dict[str, Any]
) -> None:
    if resumed_from is not None:
        changed = changed_settings(saved, tcfg)
        warning = f"; changed {', '.join(changed)}: batches differ from the original run" if changed else ""
        log.print(f"resumed from {resumed_from} at step {start}{warning}")
    elif tcfg.resume:
        log.print("train.resume: no checkpoint yet; starting from step 0")
    if data.val is None:
        log.print("no validation split with a full window of tokens; evaluation is skipped")
    if tcfg.minutes:
        log.print(f"training for {tcfg.minutes:g} minutes (at most {tcfg.steps:,} steps)")


@dataclass
class _LoopState:
    """What the loop carries between steps."""

    step: int  # the last step done
    resumed_from: Path | None
    clock: Clock  # the run's training time, which evaluation and saving leave out
    checkpoint: Path | None = None
    pending: list[torch.Tensor] = field(default_factory=list)  # per step [loss, *metrics] since last row
    history: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)
    mark: float = field(default_factory=time.perf_counter)  # when the last row was logged
    paused: float = 0.0  # seconds spent evaluating / saving since then
    flops_per_token: float = 0.0  # of training (forward + backward), for MFU
    peak_flops: float = 0.0  # per device
    peak_source: str = ""

    def record(self, loss: torch.Tensor, metrics: Metrics) -> None:
        """Keep the step's loss and metrics on the device until the next log row (no sync)."""
        self.pending.append(torch.stack([loss, *metrics.values()]))

    def summary(self, env: DistEnv) -> dict[str, Any]:
        losses = [r["loss"] for r in self.history if "loss" in r]
        last = self.checkpoint or self.resumed_from
        return {
            "step": self.step,
            "loss": losses[-1] if losses else None,
            "eval": self.eval,
            "history": self.history,
            "checkpoint": str(last) if last else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "world_size": env.world,
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops,
            "peak_flops_source": self.peak_source,
        }


def _timed(state: _LoopState, fn: Callable[[], Any]) -> Any:
    """Run `fn` (an evaluation, a save) off the clocks: neither tokens/s nor train.minutes count it."""
    began = time.perf_counter()
    try:
        return fn()
    finally:
        seconds = time.perf_counter() - began
        state.paused += seconds
        state.clock.pause(seconds)


def _maybe_log(
    state: _LoopState,
    step: int,
    grad_norm: torch.Tensor,
    names: list[str],
    tcfg: TrainConfig,
    env: DistEnv,
    lr: float,
    last: bool,
) -> dict[str, Any]:
    """Every log_every steps (and the last): mean loss/metrics since the last row, across ranks.

    NaN marks a metric a step did not produce (a hybrid's other terms): means skip it, and a metric
    with no value since the last row is left out of the row.
    """
    if not _due(step, tcfg.log_every, last):
        return {}
    values = mean_across_ranks(torch.stack(state.pending).float().nanmean(0), env).tolist()
    now = time.perf_counter()
    elapsed = max(now - state.mark - state.paused, 1e-9)
    tokens = len(state.pending) * tcfg.batch_size * tcfg.grad_accum * tcfg.seq_len * env.world
    row = {
        "step": step,
        "loss": values[0],
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens_per_s": tokens / elapsed,
        "mfu": tokens / elapsed * state.flops_per_token / (state.peak_flops * env.world),
        **{k: v for k, v in zip(names, values[1:], strict=True) if not math.isnan(v)},
    }
    state.pending, state.mark, state.paused = [], now, 0.0
    return row


def _maybe_eval(
    state: _LoopState,
    step: int,
    parts: Parts,
    data: Data,
    tcfg: TrainConfig,
    env: DistEnv,
    amp: Callable[[], AbstractContextManager],
    last: bool,
) -> dict[str, Any]:
    if data.val is None or not _due(step, tcfg.eval_every, last):
        return {}
    began = time.perf_counter()
    state.eval = _timed(state, lambda: evaluate(parts, data.val, tcfg, env, amp, data.bytes_per_token))
    return {"step": step, **state.eval, "val_seconds": time.perf_counter() - began}

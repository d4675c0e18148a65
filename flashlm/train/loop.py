"""The training loop: one plain function, `train(cfg)`, over plain parts.

Parts: the model (wrapped in DDP or sharded with FSDP2 when launched by torchrun), AdamW, a
LambdaLR schedule, the token streams, an `Objective` (batch maker + loss) and a small run log.

- **Batches** are a pure function of the step (see `flashlm.data.batches`), so resuming restores
  weights, optimizer, schedule and RNG and simply continues at the next step: the losses match an
  uninterrupted run bit for bit on CPU.
- **Weight decay** applies to the projection matrices only. Norm gains and biases set scales rather
  than store features, and decaying the embedding (also the tied LM head) shrinks the rows of rare
  tokens between their sparse updates; so none of them is decayed.
- **Precision**: bf16 autocast on CUDA ("auto"), fp32 on CPU; parameters and optimizer stay fp32.
- **Distributed**: each rank draws its own rows of the step's global batch; gradients are averaged
  by DDP (``no_sync`` on non-final micro-steps) or FSDP2; rank 0 alone writes logs and checkpoints.
- **Micro-batches** weigh equally: the step loss is the mean of the micro-batch mean losses.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flashlm.config import RunConfig, TrainConfig, save_yaml
from flashlm.data.batches import IGNORE_INDEX, BatchSlot, SpecialTokens, TokenStream, eval_batches
from flashlm.errors import CheckpointError, ConfigError, DataError
from flashlm.hardware import resolve_precision
from flashlm.model.transformer import FlashLM
from flashlm.train.checkpoint import (
    CHECKPOINTS_DIR,
    capture_rng,
    latest_checkpoint,
    link_latest,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from flashlm.train.objectives import Metrics, Objective, build_objective, forward, lm_cross_entropy

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"


# ---- distributed ---------------------------------------------------------------------------------
@dataclass
class DistEnv:
    """This process's place in the run."""

    device: torch.device
    rank: int = 0
    world: int = 1
    enabled: bool = False  # launched by torchrun: a process group exists
    owns_group: bool = False  # we created it, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The training device: for auto, cuda:local_rank when CUDA is available, else the CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda requested but no CUDA device is available; use auto or cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_distributed(device_name: str = "auto") -> DistEnv:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) when RANK/WORLD_SIZE are set."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(pick_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistEnv(device, rank, world, True, owns)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        values = values.clone()
        dist.all_reduce(values)
        values /= env.world
    return values


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; never norms, biases or embeddings. Frozen parameters are left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, plain = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and id(param) not in embeddings else plain).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, tcfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=tcfg.lr, betas=tuple(tcfg.betas),
                             fused=device.type == "cuda")


def lr_factor(index: int, tcfg: TrainConfig, clock: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer update `index` (0-based): linear warmup, then cosine
    to min_lr_ratio, or warmup-stable-decay (linear decay over the last decay_fraction of steps).

    `clock` is the share of a wall-clock budget spent (train.minutes): the schedule after warmup
    follows whichever of the two, steps or time, is further along, so a timed run ends decayed.
    """
    if index < tcfg.warmup_steps:
        return (index + 1) / tcfg.warmup_steps
    floor = tcfg.min_lr_ratio
    if tcfg.schedule == "wsd":
        decay_start = max(tcfg.warmup_steps, tcfg.steps - round(tcfg.decay_fraction * tcfg.steps))
        progress = (index - decay_start) / max(1, tcfg.steps - decay_start)
        if clock > 0 and tcfg.decay_fraction > 0:
            progress = max(progress, (clock - (1.0 - tcfg.decay_fraction)) / tcfg.decay_fraction)
        if progress < 0:
            return 1.0
        return 1.0 - (1.0 - floor) * min(progress, 1.0)
    progress = min(max((index - tcfg.warmup_steps) / max(1, tcfg.steps - tcfg.warmup_steps), clock), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Clock:
    """A run's wall-clock budget (train.minutes): seconds spent, across resumes, and the share of the
    budget spent at the last `sync`, which the lr schedule follows. Rank 0's clock speaks for every
    rank, so that all ranks use the same lr and stop at the same step."""

    budget: float  # seconds; 0 means no budget
    spent_before: float = 0.0  # by the runs this one resumes
    fraction: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def spent(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def sync(self, env: DistEnv) -> bool:
        """Update `fraction` (rank 0's reading); True once the budget is spent."""
        if self.budget <= 0:
            return False
        value = torch.tensor([self.spent() / self.budget], dtype=torch.float64, device=env.device)
        if env.enabled:
            dist.broadcast(value, src=0)
        self.fraction = min(float(value), 1.0)
        return self.fraction >= 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: TrainConfig,
                    clock: Clock | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda index: lr_factor(index, tcfg, clock.fraction if clock is not None else 0.0))


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of autocast contexts: bf16 where `precision` resolves to it on `device` ("auto": on CUDA
    and on CPUs with native bf16, `flashlm.hardware.resolve_precision`), none for fp32."""
    if resolve_precision(precision, device) != "bf16":
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


# ---- data ----------------------------------------------------------------------------------------
@dataclass
class Data:
    train: TokenStream
    val: TokenStream | None
    bytes_per_token: float | None  # of the validation text, for bits per byte
    tokenizer_file: Path | None  # copied into every checkpoint


def open_stream(shards: Any, specials: SpecialTokens | None = None) -> TokenStream:
    offsets = getattr(shards, "doc_offsets", None)
    eos = shards.meta.get("eos_id") if isinstance(getattr(shards, "meta", None), dict) else None
    return TokenStream(shards.tokens, None if offsets is None else np.asarray(offsets), eos, specials)


def special_tokens(tokenizer_file: Path | None) -> SpecialTokens | None:
    """The special ids the masked objectives need, from the run's tokenizer (None when it lacks them)."""
    from flashlm.tokenizer import Tokenizer

    if tokenizer_file is None:
        return None
    try:
        return SpecialTokens.from_tokenizer(Tokenizer.load(tokenizer_file))
    except DataError:
        return None


def bytes_per_token(shards: Any) -> float | None:
    """UTF-8 bytes per token of a split (its text bytes over its tokens); None when unknown.

    Bits per byte then read total nats / (ln 2 · bytes): exact when evaluation covers the split,
    an estimate from the split's average bytes/token when it covers a sample of windows.
    """
    try:
        n_bytes = int(shards.text_bytes)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    n_tokens = len(shards.tokens)
    return n_bytes / n_tokens if n_bytes > 0 and n_tokens else None


def open_data(tcfg: TrainConfig, vocab_size: int) -> Data:
    """Memory-mapped train (and validation) shards, checked against the model and tokenizer."""
    from flashlm.data.shards import TokenShards

    if not tcfg.data or not Path(tcfg.data).is_dir():
        raise DataError(f"train.data: {tcfg.data or 'not set'} is not a directory; point it at token shards "
                        "from `flashlm data prepare`, e.g. --set train.data=DIR")
    train = TokenShards(tcfg.data, split="train")
    val = _open_val(tcfg)
    tokenizer_file = _tokenizer_file(tcfg, train)
    top = int(train.meta.get("vocab_size", 0) or 0)
    if top > vocab_size:
        raise ConfigError(f"model.vocab_size: {vocab_size} is smaller than the shards' vocabulary ({top}); "
                          f"set model.vocab_size to at least {top}")
    specials = special_tokens(tokenizer_file)
    if val is None or len(val.tokens) < tcfg.seq_len + 1:  # no full evaluation window (val_fraction 0)
        return Data(open_stream(train, specials), None, None, tokenizer_file)
    return Data(open_stream(train, specials), open_stream(val, specials),
                bytes_per_token(val) or bytes_per_token(train), tokenizer_file)


def _open_val(tcfg: TrainConfig) -> Any:
    from flashlm.data.shards import TokenShards

    try:
        return TokenShards(tcfg.val_data or tcfg.data, split="val")
    except DataError:
        if tcfg.val_data:
            raise
        return None


def _tokenizer_file(tcfg: TrainConfig, shards: Any) -> Path | None:
    """train.tokenizer, else the shard directory's tokenizer.json (if any), checked against the shards."""
    from flashlm.tokenizer import TOKENIZER_FILE, Tokenizer

    path = Path(tcfg.tokenizer or tcfg.data)
    path = path / TOKENIZER_FILE if path.is_dir() else path
    if not path.is_file():
        if tcfg.tokenizer:
            raise ConfigError(f"train.tokenizer: no tokenizer at {path}; pass a tokenizer.json or its folder")
        return None
    shards.check_tokenizer(Tokenizer.load(path))
    return path


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


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (no clipping when max_norm <= 0); return the norm before it."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train_step(parts: Parts, optimizer: torch.optim.Optimizer, scheduler: Any, objective: Objective,
               data: Data, tcfg: TrainConfig, env: DistEnv, step: int,
               amp: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, Metrics, torch.Tensor]:
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
    if parts.extra is not None and env.enabled:  # DDP averages the model's gradients only
        for param in parts.extra.parameters():
            if param.grad is not None:
                param.grad.copy_(mean_across_ranks(param.grad, env))
    grad_norm = clip_gradients(parts.model if parts.extra is None else parts.trained, tcfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total, sums, grad_norm


# ---- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(parts: Parts, val: TokenStream, tcfg: TrainConfig, env: DistEnv,
             amp: Callable[[], AbstractContextManager],
             bytes_per_tok: float | None = None) -> dict[str, float]:
    """Loss, perplexity and bits per byte on fixed validation windows.

    eval_batches global batches (batch_size × world windows each), so the windows, hence the
    numbers, do not depend on how many ranks share them.
    """
    parts.forward.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)  # nats, target tokens
    count = tcfg.eval_batches * tcfg.batch_size * env.world
    for batch in eval_batches(val, tcfg.seq_len, tcfg.batch_size, count, env.rank, env.world,
                              tcfg.packed_attention):
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
def save(parts: Parts, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: RunConfig, env: DistEnv,
         step: int, data: Data, clock: Clock) -> Path | None:
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
        state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": capture_rng(),
                 "config": cfg.to_dict(), "world_size": env.world, "train_seconds": clock.spent()}
        if parts.extra is not None:  # the objective's own weights (e.g. a distillation projection)
            state["objective"] = {k: v.detach().cpu() for k, v in parts.extra.state_dict().items()}
        path = save_checkpoint(Path(cfg.train.out) / CHECKPOINTS_DIR, step, model_state, cfg.model, state,
                               data.tokenizer_file, cfg.train.keep_last)
        link_latest(Path(cfg.train.out), path)
    env.barrier()
    return path


def resume(parts: Parts, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: RunConfig,
           env: DistEnv, clock: Clock) -> tuple[int, Path | None, dict[str, Any]]:
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
        set_optimizer_state_dict(parts.trained, optimizer, optim_state_dict=state["optimizer"],
                                 options=options)
        if parts.extra is not None:
            parts.extra.load_state_dict(state["objective"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        clock.spent_before = float(state.get("train_seconds", 0.0))
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: its training state does not fit this run ({reason})") from None
    return int(state["step"]), path, dict(state["config"].get("train") or {})


def _refuse_to_mix_runs(out: Path) -> None:
    """A fresh run must not write into a folder holding another run's checkpoints (pruning and
    `latest` would mix them)."""
    found = latest_checkpoint(out / CHECKPOINTS_DIR)
    if found is not None:
        raise ConfigError(f"train.out: {out} already holds checkpoints (latest {found.name}); resume with "
                          "--resume (train.resume=true) or choose another train.out")


def changed_settings(saved: dict[str, Any], tcfg: TrainConfig) -> list[str]:
    """Train settings that differ from the checkpoint's and change which batches a step sees."""
    keys = ("seed", "batch_size", "seq_len", "grad_accum", "objective", "objectives", "masking",
            "packed_attention", "data")
    return [k for k in keys if saved.get(k) != getattr(tcfg, k)]


# ---- logging -------------------------------------------------------------------------------------
class RunLog:
    """metrics.jsonl, optional TensorBoard and a rich progress bar; silent off rank 0."""

    def __init__(self, cfg: RunConfig, enabled: bool, start: int) -> None:
        self.enabled, self.out = enabled, Path(cfg.train.out)
        self.progress, self.task, self.writer = None, None, None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, self.out / "config.yaml")
        _truncate_metrics(self.out / METRICS_FILE, start)
        self.progress = _progress_bar()
        total = None if cfg.train.minutes else cfg.train.steps  # a timed run ends on the clock
        precision = resolve_precision(cfg.train.precision, pick_device(cfg.train.device))
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", tps="-",
                                           precision=precision)
        self.progress.start()
        if cfg.train.tensorboard:
            self.writer = _tensorboard(self.out / "tensorboard", self.print)

    def print(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, highlight=False)

    def advance(self, row: dict[str, Any]) -> None:
        if self.progress is None:
            return
        fields = {}
        if "loss" in row:
            fields = {"loss": f"{row['loss']:.4f}", "tps": f"{row['tokens_per_s']:,.0f}"}
        self.progress.update(self.task, advance=1, **fields)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if "val_loss" in row:
            extra = f", bpb {row['val_bpb']:.4f}" if "val_bpb" in row else ""
            self.print(f"step {row['step']}: val loss {row['val_loss']:.4f}, ppl {row['val_ppl']:.2f}{extra}")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
        if self.enabled:
            plot_losses(self.out / METRICS_FILE, self.out / PLOT_FILE)


def _progress_bar() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]train[/] {task.fields[precision]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                    TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))


def _tensorboard(directory: Path, warn: Callable[[str], None]) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("train.tensorboard: tensorboard is not installed (pip install tensorboard); skipping it")
        return None
    return SummaryWriter(str(directory))


def _truncate_metrics(path: Path, start: int) -> None:
    """Drop rows past the resumed step (a killed run may have logged beyond its last checkpoint)."""
    if not path.is_file():
        return
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= start] if start else []
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (a torn last line is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_losses(metrics_file: Path, png: Path) -> None:
    """Training (and validation) loss against step, as a PNG (matplotlib's Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_file) if metrics_file.is_file() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, style, label=label)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="FlashLM training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)


# ---- the loop ------------------------------------------------------------------------------------
StepCallback = Callable[[int, dict[str, Any]], Any]


def train(cfg: RunConfig, callback: StepCallback | None = None,
          objective: Objective | None = None) -> dict[str, Any]:
    """Pre-train `cfg.model` on `cfg.train.data`; returns a summary (step reached, last loss, last
    eval, per-row history, output and checkpoint paths).

    Works alone or under ``torchrun`` (DDP, or FSDP2 with ``train.distributed: fsdp``).
    `callback(step, row)` runs after every step on every rank (`row`: what was logged, maybe empty);
    a true return value saves a checkpoint and stops, e.g. for a time budget (return the same
    value on every rank). `objective` replaces the registry's ``train.objective`` (e.g. one built
    around a teacher). With a ``distill:`` section the run trains a student: the objective gains
    the distillation terms (`flashlm.train.distill.distill_objective`).
    """
    cfg.validate()
    objective = objective or build_objective(cfg.train)
    env = setup_distributed(cfg.train.device)
    try:
        return _run(cfg, objective, env, callback)
    finally:
        teardown(env)


def _run(cfg: RunConfig, objective: Objective, env: DistEnv, callback: StepCallback | None) -> dict[str, Any]:
    tcfg = cfg.train
    data = open_data(tcfg, cfg.model.vocab_size)
    if cfg.distill is not None and objective.name != "distill":
        from flashlm.train.distill import distill_objective

        objective = distill_objective(cfg, objective, data, env.device, env.is_main, env.barrier)
    parts = build_model(cfg, env, objective)
    parts.extra = _place_objective(objective, env, tcfg)
    optimizer = build_optimizer(parts.trained, tcfg, env.device)
    clock = Clock(budget=tcfg.minutes * 60)
    scheduler = build_scheduler(optimizer, tcfg, clock)
    start, resumed_from, saved = resume(parts, optimizer, scheduler, cfg, env, clock)
    log = RunLog(cfg, env.is_main, start)
    _announce(log, tcfg, data, start, resumed_from, saved)
    amp = autocast_for(tcfg.precision, env.device)
    state = _LoopState(start, resumed_from)
    try:
        for step in range(start + 1, tcfg.steps + 1):
            lr = optimizer.param_groups[0]["lr"]
            loss, metrics, grad_norm = train_step(parts, optimizer, scheduler, objective, data, tcfg, env,
                                                  step, amp)
            state.record(loss, metrics)
            state.step = step
            out_of_time = clock.sync(env)
            last = out_of_time or step == tcfg.steps
            row = _maybe_log(state, step, grad_norm, list(metrics), tcfg, env, lr, last)
            row.update(_maybe_eval(state, step, parts, data, tcfg, env, amp, last))
            if row:
                state.history.append(row)
                log.write(row)
            log.advance(row)
            stop = (bool(callback(step, row)) if callback is not None else False) or out_of_time
            if stop or _due(step, tcfg.save_every, last):
                save_now = lambda s=step: save(parts, optimizer, scheduler, cfg, env, s, data, clock)
                state.checkpoint = _timed(state, save_now)
            if stop:
                break
    finally:
        log.close()
    return {**state.summary(env), "out": str(tcfg.out)}


def _place_objective(objective: Objective, env: DistEnv, tcfg: TrainConfig) -> nn.Module | None:
    """Move a loss that is a module (e.g. holding a teacher) to the device; return it when it has
    trainable parameters of its own (the loop then trains them with the model's and keeps them, and
    their optimizer state, in every checkpoint)."""
    if not isinstance(objective.loss, nn.Module):
        return None
    objective.loss.to(env.device)
    if not any(p.requires_grad for p in objective.loss.parameters()):
        return None
    if env.enabled and tcfg.distributed == "fsdp":
        raise ConfigError(f"train.distributed: {objective.name} has trainable parameters of its own (a "
                          "hidden-state projection) that FSDP does not shard yet; use ddp or drop that term")
    return objective.loss


def _due(step: int, every: int, last: bool) -> bool:
    return step % every == 0 or last


def _announce(log: RunLog, tcfg: TrainConfig, data: Data, start: int, resumed_from: Path | None,
              saved: dict[str, Any]) -> None:
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
    checkpoint: Path | None = None
    pending: list[torch.Tensor] = field(default_factory=list)  # per step [loss, *metrics] since last row
    history: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)
    mark: float = field(default_factory=time.perf_counter)  # when the last row was logged
    paused: float = 0.0  # seconds spent evaluating / saving since then

    def record(self, loss: torch.Tensor, metrics: Metrics) -> None:
        """Keep the step's loss and metrics on the device until the next log row (no sync)."""
        self.pending.append(torch.stack([loss, *metrics.values()]))

    def summary(self, env: DistEnv) -> dict[str, Any]:
        losses = [r["loss"] for r in self.history if "loss" in r]
        last = self.checkpoint or self.resumed_from
        return {"step": self.step, "loss": losses[-1] if losses else None, "eval": self.eval,
                "history": self.history, "checkpoint": str(last) if last else None,
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "world_size": env.world}


def _timed(state: _LoopState, fn: Callable[[], Any]) -> Any:
    began = time.perf_counter()
    try:
        return fn()
    finally:
        state.paused += time.perf_counter() - began


def _maybe_log(state: _LoopState, step: int, grad_norm: torch.Tensor, names: list[str], tcfg: TrainConfig,
               env: DistEnv, lr: float, last: bool) -> dict[str, Any]:
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
    row = {"step": step, "loss": values[0], "lr": lr,
           "grad_norm": float(grad_norm), "tokens_per_s": tokens / elapsed,
           **{k: v for k, v in zip(names, values[1:], strict=True) if not math.isnan(v)}}
    state.pending, state.mark, state.paused = [], now, 0.0
    return row


def _maybe_eval(state: _LoopState, step: int, parts: Parts, data: Data, tcfg: TrainConfig, env: DistEnv,
                amp: Callable[[], AbstractContextManager], last: bool) -> dict[str, Any]:
    if data.val is None or not _due(step, tcfg.eval_every, last):
        return {}
    state.eval = _timed(state, lambda: evaluate(parts, data.val, tcfg, env, amp, data.bytes_per_token))
    return {"step": step, **state.eval}

"""What every FlashLM training loop shares (pre-training's `flashlm.training.loop` and fine-tuning's
`flashlm.training.finetune.fit`): seeding, the optimizer (AdamW, or Muon with AdamW) with its parameter
groups, the lr schedule, the training-time budget it can follow, autocast, and the optimizer update
(clip, step, schedule, zero).

- **Weight decay** applies to the projection matrices only. Norm gains and biases set scales rather
  than store features, and decaying the embedding (also the tied LM head) shrinks the rows of rare
  tokens between their sparse updates; so none of them is decayed.
- **Muon** (``optimizer: muon``): the hidden matrices, the 2-D weights inside the transformer blocks,
  step with Muon (`flashlm.training.muon`: `torch.optim.Muon`, orthogonalising in bf16 only where bf16
  matmuls are native) at ``muon_lr``; embeddings, norm gains, the LM head and an objective's own
  modules keep AdamW at ``lr`` (the split of the modded-nanogpt and nanochat speed-runs). Both step as
  one `CombinedOptimizer`, so the schedule, the update and checkpoints treat them as one optimizer.
  Under FSDP2 Muon's matrices are sharded DTensors; its Newton-Schulz matmuls run on them as DTensor
  ops, which gather what they need.
- **Precision**: bf16 autocast where it pays (`flashlm.hardware.resolve_precision`), else fp32;
  parameters and optimizer stay fp32.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flashlm.config import TrainConfig
from flashlm.errors import ConfigError
from flashlm.hardware import resolve_precision
from flashlm.model.transformer import FlashLM
from flashlm.training.muon import Muon


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- optimizer -----------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float, exclude: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """Decay matrices; never norms, biases or embeddings. Frozen parameters, and those whose id is in
    `exclude` (stepped by another optimizer), are left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, plain = [], []
    for param in model.parameters():
        if param.requires_grad and id(param) not in exclude:
            (decay if param.ndim >= 2 and id(param) not in embeddings else plain).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    sharded = {id(p) for g in groups for p in g["params"] if hasattr(p, "full_tensor")}
    if sharded and len(sharded) < len(decay) + len(plain):  # FSDP model + an objective's unsharded head:
        groups = [
            {**g, "params": [p for p in g["params"] if (id(p) in sharded) == side]}  # fused/foreach
            for g in groups
            for side in (True, False)
        ]  # steps never mix DTensors with tensors
    return [g for g in groups if g["params"]]


def adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: Any,
    device: torch.device,
    exclude: frozenset[int] = frozenset(),
) -> torch.optim.AdamW:
    """AdamW over `param_groups` (fused on CUDA)."""
    groups = param_groups(model, weight_decay, exclude)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device.type == "cuda")


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights inside the transformer blocks of every FlashLM in `model` (the attention
    and MLP projections): what Muon steps. Embeddings, norms, the LM head and any module outside the
    blocks (an NSP head, a distillation projection) are not among them."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, FlashLM):
            for param in module.layers.parameters():
                if param.requires_grad and param.ndim == 2:
                    found[id(param)] = param
    return list(found.values())


class CombinedOptimizer(torch.optim.Optimizer):
    """Optimizers over disjoint parameters, stepped, scheduled and saved as one.

    Its `param_groups` are the optimizers' own group dicts, in order (an lr schedule setting them
    reaches every optimizer), and one `state` mapping is shared by all of them (keys are parameters,
    which are disjoint), so `state_dict` and `load_state_dict` are the base class's over all groups:
    ``torch.distributed.checkpoint.state_dict`` saves and restores it like any single optimizer.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = list(optimizers)
        super().__init__([group for opt in self.optimizers for group in opt.param_groups], {})
        for opt in self.optimizers:
            self.state.update(opt.state)
            opt.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base class loads into new group dicts and a new state; hand them back to the optimizers."""
        super().load_state_dict(state_dict)
        groups = iter(self.param_groups)
        for opt in self.optimizers:
            opt.param_groups = [next(groups) for _ in opt.param_groups]
            opt.state = self.state


def muon_with_adamw(
    model: nn.Module,
    lr: float,
    muon_lr: float,
    muon_momentum: float,
    weight_decay: float,
    betas: Any,
    device: torch.device,
) -> CombinedOptimizer:
    """Muon (`muon_lr`, `muon_momentum`) for `hidden_matrices`, AdamW (`lr`) for the rest. AdamW's groups
    come first, so ``param_groups[0]["lr"]`` is still the AdamW lr; Muon's group keeps its share of the
    peak in ``lr_ratio`` for `set_lr`."""
    hidden = hidden_matrices(model)
    if not hidden:
        raise ConfigError("optimizer muon: no hidden matrices to step (all frozen?); use adamw")
    ns_dtype = torch.bfloat16 if resolve_precision("auto", device) == "bf16" else torch.float32
    muon = Muon(hidden, ns_dtype, lr=muon_lr, weight_decay=weight_decay, momentum=muon_momentum)
    muon.param_groups[0]["lr_ratio"] = muon_lr / lr
    rest = adamw(model, lr, weight_decay, betas, device, frozenset(id(p) for p in hidden))
    return CombinedOptimizer(rest, muon)


def make_optimizer(model: nn.Module, settings: Any, device: torch.device) -> torch.optim.Optimizer:
    """`settings.optimizer` (a `TrainConfig` or a `FinetuneConfig`): AdamW over every trainable parameter,
    or Muon for the hidden matrices with AdamW for the rest."""
    if settings.optimizer == "muon":
        return muon_with_adamw(
            model,
            settings.lr,
            settings.muon_lr,
            settings.muon_momentum,
            settings.weight_decay,
            settings.betas,
            device,
        )
    return adamw(model, settings.lr, settings.weight_decay, settings.betas, device)


def build_optimizer(model: nn.Module, tcfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """train.optimizer: AdamW over every trainable parameter, or Muon for the hidden matrices with AdamW."""
    return make_optimizer(model, tcfg, device)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (no clipping when max_norm <= 0); return the norm before it.

    Under FSDP the model's gradients are sharded (DTensor) and an objective's own parameters (an NSP head)
    are not: the two norms are taken apart, then combined."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = max_norm if max_norm > 0 else float("inf")
    sharded = [p.grad for p in params if hasattr(p.grad, "full_tensor")]
    if not sharded or len(sharded) == len(params):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    plain = [p.grad for p in params if not hasattr(p.grad, "full_tensor")]
    parts = [torch.nn.utils.get_total_norm(sharded).full_tensor(), torch.nn.utils.get_total_norm(plain)]
    norm = torch.linalg.vector_norm(torch.stack([n.to(parts[0].device) for n in parts]))
    coef = min(max_norm / (float(norm) + 1e-6), 1.0)  # as clip_grad_norm_ computes it
    if coef < 1.0:
        for grads in (sharded, plain):
            torch._foreach_mul_(grads, coef)
    return norm


def apply_update(
    clipped: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, scheduler: Any = None
) -> torch.Tensor:
    """The end of every training step: clip `clipped`'s gradients, step the optimizer (and the
    schedule, when given), drop the gradients. Returns the gradient norm before clipping."""
    grad_norm = clip_gradients(clipped, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the peak-relative lr: `lr` on every group, times its ``lr_ratio`` where it has one (Muon's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_ratio"] if "lr_ratio" in group else lr


# ---- schedule ------------------------------------------------------------------------------------
WARMUP_CLOCK_SHARE = 0.1  # of a time budget: the latest a timed run's warmup ends


def cosine(progress: float, floor: float) -> float:
    """Half a cosine from 1 (progress 0) down to `floor` (progress 1)."""
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(index: int, tcfg: TrainConfig, clock: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer update `index` (0-based): linear warmup, then cosine
    to min_lr_ratio, or warmup-stable-decay (linear decay over the last decay_fraction of steps).

    `clock` is the share of a wall-clock budget spent (train.minutes): the schedule follows whichever of
    the two, steps or time, is further along, so a timed run ends decayed, and its warmup ends by
    WARMUP_CLOCK_SHARE of the budget at the latest (a short run on a slow machine still reaches its peak lr).
    """
    if index < tcfg.warmup_steps:
        warm = max((index + 1) / tcfg.warmup_steps, clock / WARMUP_CLOCK_SHARE)
        if warm < 1.0:
            return warm
        index = tcfg.warmup_steps  # warmed up by the clock: the schedule goes on from its start
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
    return cosine(progress, floor)


@dataclass
class Clock:
    """A run's budget of training time (train.minutes): seconds spent training, across resumes, and the
    share of the budget spent at the last `sync`, which the lr schedule follows. Time in evaluation and
    checkpoint saves (`pause`) does not count, so how often a run evaluates does not change how long it
    trains. Rank 0's clock speaks for every rank, so that all ranks use the same lr and stop at the same
    step."""

    budget: float  # seconds; 0 means no budget
    spent_before: float = 0.0  # by the runs this one resumes
    fraction: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds excluded since `started`

    def start(self) -> None:
        """Count from now (the first training step), not from the setup before it."""
        self.started, self.paused = time.perf_counter(), 0.0

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation, a checkpoint save) out of the time spent."""
        self.paused += seconds

    def spent(self) -> float:
        return self.spent_before + time.perf_counter() - self.started - self.paused

    def sync(self, env: Any) -> bool:
        """Update `fraction` (rank 0's reading, `env` a `flashlm.training.distributed.DistEnv`); True once
        the budget is spent."""
        if self.budget <= 0:
            return False
        value = torch.tensor([self.spent() / self.budget], dtype=torch.float64, device=env.device)
        if env.enabled:
            dist.broadcast(value, src=0)
        self.fraction = min(float(value), 1.0)
        return self.fraction >= 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, tcfg: TrainConfig, clock: Clock | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda index: lr_factor(index, tcfg, clock.fraction if clock is not None else 0.0)
    )


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of autocast contexts: bf16 where `precision` resolves to it on `device` ("auto": on CUDA
    and on CPUs with native bf16, `flashlm.hardware.resolve_precision`), none for fp32."""
    if resolve_precision(precision, device) != "bf16":
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)

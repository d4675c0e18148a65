"""Task heads around one base `FlashLM`, the way Hugging Face builds its ``…ForX`` models.

The base model carries the transformer and its LM head only. A head is a module of its own:

- `NSPHead`: next-sentence prediction, a [CLS]-style classifier on the first position's final state plus
  the causal LM's `junction_evidence`. The objectives that train NSP (``nsp``, and the hybrid with an
  ``nsp_weight``) own one (`flashlm.training.objectives`); the loop trains and checkpoints it with the
  model, and a checkpoint keeps it in ``nsp_head.safetensors`` beside ``model.safetensors``.
- `FlashLMForPretraining`: a FlashLM with its NSP head, for evaluating NSP on a checkpoint
  (``flashlm eval nsp``); it runs like the FlashLM it wraps.

Checkpoints written before the head moved off the base model hold ``nsp_head.*`` keys in
``model.safetensors``: `FlashLM.from_pretrained` drops them and `FlashLMForPretraining.from_pretrained`
reads its head from them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashlm.errors import CheckpointError, first_line
from flashlm.model.transformer import WEIGHTS_FILE, FlashLM, _atomic_write

NSP_HEAD_FILE = "nsp_head.safetensors"
NSP_PREFIX = "nsp_head."  # the head's keys in a (pre-heads) base state dict and in an objective's state
# Distinct from every seed of `FlashLM` init: the head's initial weights depend on the seed alone.
_NSP_SEED_OFFSET = 0x4E5350


class NSPHead(nn.Module):
    """Next-sentence-prediction logits [B, 2] for ``<bos> A <sep> B <eos>`` pairs: a linear classifier
    (``weight`` [2, d], ``bias`` [2]; the keys old checkpoints hold under ``nsp_head.``) on the first
    position's final hidden state and, given the unmasked pairs, the causal LM's `junction_evidence`
    added to the "B follows A" logit.

    Initialised like the base model's linear layers (weight ~ N(0, init_std), bias 0), from a generator
    seeded with `seed`, so the head does not draw from (or shift) the global random stream; training runs
    start from `as_drawn_by_flashlm` instead, the weights the head had when it was part of FlashLM.
    """

    def __init__(self, d_model: int, init_std: float = 0.02, seed: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2, d_model))
        self.bias = nn.Parameter(torch.empty(2))
        self.init_std = init_std
        self.reset_parameters(seed)

    @classmethod
    def for_model(cls, model_or_cfg: Any, seed: int = 0) -> NSPHead:
        """A head sized for a FlashLM (or its `ModelConfig`)."""
        cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
        return cls(cfg.d_model, cfg.init_std, seed)

    @classmethod
    def as_drawn_by_flashlm(cls, cfg: Any, seed: int) -> NSPHead:
        """The head with the initial weights it had as FlashLM's last parameter (before heads moved off
        the base model): the torch stream seeded with `seed`, after every base parameter's draw. Training
        runs use it, so their figures match runs from before the move bit for bit. Costs one more
        initialisation's worth of random draws (one parameter in memory at a time); the global random
        state is left as it was."""
        head = cls(cfg.d_model, cfg.init_std)
        with torch.device("meta"):
            base = FlashLM(cfg)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for name, param in base.named_parameters():  # the draws `FlashLM.reset_parameters` makes
                base.init_parameter_(name, torch.empty(param.shape, dtype=param.dtype))
            nn.init.normal_(head.weight, std=cfg.init_std)  # then nn.Linear(d, 2), as `init_parameter_` drew it
            head.bias.zero_()
        return head

    def reset_parameters(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(int(seed) + _NSP_SEED_OFFSET)
        with torch.no_grad():
            weight = torch.empty(self.weight.shape).normal_(0.0, self.init_std, generator=generator)
            self.weight.copy_(weight)
            self.bias.zero_()

    def forward(
        self,
        model: nn.Module,
        hidden: torch.Tensor,
        pair_ids: torch.Tensor | None = None,
        sep_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """NSP logits of `model`'s final hidden states [B, T, d] (`model`: the FlashLM, possibly wrapped
        in DDP or compiled; it runs the junction evidence's causal pass)."""
        logits = F.linear(hidden[:, 0], self.weight.to(hidden.dtype), self.bias.to(hidden.dtype))
        if pair_ids is None or sep_pos is None:
            return logits
        return logits + F.pad(junction_evidence(model, pair_ids, sep_pos)[:, None].to(logits.dtype), (1, 0))

    def head_state(self) -> dict[str, torch.Tensor]:
        """The weights under their checkpoint keys (``weight``, ``bias``), on the CPU."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}


def _base(model: nn.Module) -> FlashLM:
    """The FlashLM inside DDP / torch.compile / head wrappers (for its LM head)."""
    while not isinstance(model, FlashLM):
        for name in ("_orig_mod", "module", "model"):
            inner = getattr(model, name, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            raise TypeError(f"no FlashLM inside {type(model).__name__}")
    return model


def junction_evidence(model: nn.Module, pair_ids: torch.Tensor, sep_pos: torch.Tensor) -> torch.Tensor:
    """How much A raises the causal LM's probability of B's first token: log p(B₁ | <bos> A) −
    log p(B₁ | <bos>), per ``<bos> A <sep> B`` row [B]. One causal pass of `model` over the A side.

    A [CLS]-style head learns next-sentence prediction only from cues it must discover itself; the
    model's own left-to-right LM already knows whether B's start continues A, so this evidence tells true
    from random B where the head alone does not learn to (see docs/notes/nsp.md)."""
    net = _base(model)  # the bare FlashLM, as before heads moved off it (outside DDP and recorders)
    rows = torch.arange(pair_ids.shape[0], device=pair_ids.device)
    hidden = net(pair_ids[:, : int(sep_pos.max())], mode="causal", compute_logits=False).hidden
    first_of_b = pair_ids[rows, sep_pos + 1]
    logits = net.logits(torch.stack([hidden[rows, sep_pos - 1], hidden[:, 0]]))
    logp = logits.float().log_softmax(-1)
    return logp[0, rows, first_of_b] - logp[1, rows, first_of_b]


def nsp_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The NSP head's weights (keys ``weight``, ``bias``) found in `state` under ``…nsp_head.`` keys: a
    pre-heads base state dict, or an objective's state (``nsp_head.weight``, ``base.nsp_head.weight``)."""
    found = {}
    for key, value in state.items():
        _, sep, rest = key.rpartition(NSP_PREFIX)
        if sep and "." not in rest:
            found[rest] = value
    return found


def save_nsp_head(directory: str | os.PathLike, state: dict[str, torch.Tensor]) -> Path:
    """Write `state` (an `NSPHead` state dict) as ``directory/nsp_head.safetensors``."""
    from safetensors.torch import save_file

    path = Path(directory) / NSP_HEAD_FILE
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    _atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return path


def load_nsp_state(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
    """The NSP head saved with a checkpoint: ``nsp_head.safetensors``, else the ``nsp_head.*`` keys of an
    older ``model.safetensors``; None when the checkpoint has none."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    for name, prefixed in ((NSP_HEAD_FILE, False), (WEIGHTS_FILE, True)):
        path = directory / name
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                keys = [k for k in f.keys() if k.startswith(NSP_PREFIX) or not prefixed]  # noqa: SIM118
                state = {k.removeprefix(NSP_PREFIX) if prefixed else k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged weights file ({exc}); use another checkpoint") from None
        if state:
            return state
    return None


class FlashLMForPretraining(nn.Module):
    """One base `FlashLM` plus its `NSPHead`. Calls, `logits` and `cfg` are the FlashLM's, so it evaluates
    wherever a FlashLM does; `nsp_logits` adds next-sentence prediction."""

    def __init__(self, model: FlashLM, nsp_head: NSPHead | None = None) -> None:
        super().__init__()
        self.model = model
        self.nsp_head = nsp_head if nsp_head is not None else NSPHead.for_model(model)

    @property
    def cfg(self) -> Any:
        return self.model.cfg

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def nsp_logits(
        self, hidden: torch.Tensor, pair_ids: torch.Tensor | None = None, sep_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.nsp_head(self.model, hidden, pair_ids, sep_pos)

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
        """The FlashLM checkpoint plus ``nsp_head.safetensors``."""
        path = self.model.save_pretrained(directory, tokenizer)
        save_nsp_head(path, self.nsp_head.state_dict())
        return path

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> FlashLMForPretraining:
        """Load a checkpoint with its NSP head (a checkpoint without one gets a fresh head, seed 0)."""
        return cls.with_head_from(FlashLM.from_pretrained(directory, device, dtype), directory)

    @classmethod
    def with_head_from(cls, model: FlashLM, directory: str | os.PathLike) -> FlashLMForPretraining:
        """`model` (loaded from `directory`) with the NSP head saved in `directory` (fresh when none)."""
        param = next(model.parameters())
        head = NSPHead.for_model(model)
        state = load_nsp_state(directory)
        if state is not None:
            try:
                head.load_state_dict(state)
            except RuntimeError as exc:
                reason = first_line(exc)[:160]
                raise CheckpointError(f"{directory}: the NSP head does not fit the model ({reason})") from None
        return cls(model, head.to(device=param.device, dtype=param.dtype)).train(model.training)

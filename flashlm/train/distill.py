"""Knowledge distillation: divergences, the KD loss, teachers (online or cached top-k), the logit cache.

The loss on the positions an objective trains (``targets != IGNORE_INDEX``), in fp32, averaged over them::

    loss = α·CE(student, hard labels) + (1 − α)·T²·D(teacher_T ‖ student_T)
           [+ w_h·hidden-state loss] [+ w_a·attention transfer]

with ``p_T = softmax(z/T)`` on both sides and D one of forward KL, reverse KL, generalised JSD(β) or
total variation. The teacher is either full logits or a `TopK` pair (ids, log-probs) from a cache.

**In the training loop** (`flashlm.train(cfg)` with a ``distill:`` section, see `DistillConfig` in
flashlm.config): `distill_objective` wraps the run's own objective; its loss is the hard-label term, so the
student can be distilled under CLM, masked LM / NSP or their hybrid (masked batches: the teacher sees the
same corrupted input, bidirectionally). The hidden-state projection is trained and checkpointed with the
student. ``student_init: teacher`` copies every k-th teacher layer before training. With the plain CLM
objective at T = 1 the CE and D share one log-softmax, so a cached-teacher step costs about a CE step.

**Top-k teachers and the missing mass.** The teacher is renormalised over its k ids at temperature T
(``log_softmax(logprobs / T)`` over the k entries: exact for any T, because stored log-probs differ from
logits by a per-position constant). The student keeps its full-vocabulary ``log_softmax`` gathered at those
ids, plus one implicit *rest bucket* holding its mass outside them, ``r_S = 1 − Σ_k p_S`` (the teacher's
rest is 0 after renormalisation). Per divergence:

- forward KL: ``Σ_k p̃_T (log p̃_T − log p_S)``; the rest term is 0·log(0/r_S) = 0, so mass outside the
  top-k is penalised only implicitly (raising ``log p_S`` at the k ids means shrinking r_S). This is the
  sparse KL of DistillKit; it is ≥ 0 and 0 iff p_S equals p̃_T on the k ids.
- total variation: ``½(Σ_k |p̃_T − p_S| + r_S)``: the rest is penalised explicitly.
- generalised JSD(β): the k-id terms plus the rest bucket's exact contribution ``(1 − β)·r_S·log(1/(1 − β))``.
- reverse KL: KL(p_S ‖ p̃_T) is infinite whenever r_S > 0, so the student is renormalised over the k ids
  too (``p_S / (1 − r_S)``); the rest is then not penalised by D at all, only by the CE term.

With k = vocab the rest is 0 and every top-k loss equals the full-logit loss.

**The cache** (`build_logit_cache`, `LogitCache`) stores, for every position i of a token stream, the
teacher's top-k prediction of token i + 1. The teacher reads the stream in windows of ``seq_len`` tokens
that advance by ``stride`` (default ``seq_len // 2``) and keeps the predictions of each window's last
``stride`` positions, so every position (after the stream's first window) was predicted with at least
``seq_len − stride`` tokens of context; ``stride = seq_len`` (consecutive windows) halves the cost but gives
the first positions of each window almost no context. Training windows start at any offset s and read cache
positions s … s + T − 1, so a student window sees a different left context than the teacher did. That is
the price of an any-offset cache (DistillKit-style offline distillation): the teacher's prediction is still a
prediction of the same target token, only from its own context.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flashlm.config import DIVERGENCE_ALIASES, DIVERGENCES, DistillConfig, ModelConfig, TrainConfig
from flashlm.data.batches import IGNORE_INDEX
from flashlm.errors import CheckpointError, ConfigError, DataError, FlashLMError
from flashlm.model.transformer import FlashLM, LMOutput

_ALIASES = DIVERGENCE_ALIASES
CACHE_FORMAT, CACHE_VERSION = "flashlm-logit-cache", 1
CACHE_META, CACHE_PROGRESS = "meta.json", "progress.json"
CACHE_IDS, CACHE_LOGPROBS = "ids.bin", "logprobs.bin"
TOKENIZER_FILE = "tokenizer.json"


# ---- teacher signals ------------------------------------------------------------------------------
@dataclass
class TopK:
    """A sparse teacher: its top-k ids [..., k] and their log-probabilities [..., k] (at T = 1)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    vocab_size: int | None = None  # the teacher's vocabulary; the student's extra (padded) rows are dropped


TeacherSignal = torch.Tensor | TopK | tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Dists:
    """Log-probabilities over a common support: [N, S] each; `rest` the student's mass outside it [N]."""

    student: torch.Tensor
    teacher: torch.Tensor
    rest: torch.Tensor | None = None


def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask.to(x.device)]


def _student_logprobs(s: torch.Tensor, width: int, log_probs: bool) -> torch.Tensor:
    """log-softmax of the student's first `width` logits; from log-probs (`log_probs`), a renormalisation."""
    if width < s.shape[-1]:
        s = s[:, :width]
        return s - s.logsumexp(-1, keepdim=True) if log_probs else s.log_softmax(-1)
    return s if log_probs else s.log_softmax(-1)


def _distributions(student_logits: torch.Tensor, teacher: TeacherSignal, mask: torch.Tensor | None,
                   temperature: float, log_probs: bool = False) -> _Dists:
    """Student and teacher log-probs at `temperature` on the masked positions (fp32).

    `log_probs`: the student's tensor already holds log-probabilities at T = 1 (shared with the CE term)."""
    if log_probs and temperature != 1.0:
        raise ValueError("student log-probabilities can stand for logits only at temperature 1")
    s = _select(student_logits, mask).float()
    s = s / temperature if temperature != 1.0 else s
    if isinstance(teacher, tuple):
        teacher = TopK(*teacher)
    if isinstance(teacher, TopK):
        ids = _select(teacher.ids.to(s.device), mask).long()
        s_k = _student_logprobs(s, teacher.vocab_size or s.shape[-1], log_probs).gather(-1, ids)
        t_k = (_select(teacher.logprobs.to(s.device), mask).float() / temperature).log_softmax(-1)
        rest = (-torch.expm1(s_k.logsumexp(-1))).clamp_min(0.0)
        return _Dists(s_k, t_k, rest)
    t = _select(teacher.to(s.device), mask).float() / temperature
    width = min(s.shape[-1], t.shape[-1])  # padded extra rows (teacher or student) are sliced off
    return _Dists(_student_logprobs(s, width, log_probs), t[:, :width].log_softmax(-1))


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over the last dim, with 0·log 0 = 0."""
    diff = torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp - logq)
    return (logp.exp() * diff).sum(-1)


def _forward_kl(d: _Dists, beta: float) -> torch.Tensor:
    return _kl(d.teacher, d.student)


def _reverse_kl(d: _Dists, beta: float) -> torch.Tensor:
    student = d.student if d.rest is None else d.student - d.student.logsumexp(-1, keepdim=True)
    return _kl(student, d.teacher)


def _generalized_jsd(d: _Dists, beta: float) -> torch.Tensor:
    log_m = torch.logaddexp(d.teacher + math.log(beta), d.student + math.log1p(-beta))
    out = beta * _kl(d.teacher, log_m) + (1 - beta) * _kl(d.student, log_m)
    if d.rest is not None:  # the rest bucket: p_T = 0, M = (1 − β)·r_S
        out = out - (1 - beta) * math.log1p(-beta) * d.rest
    return out


def _total_variation(d: _Dists, beta: float) -> torch.Tensor:
    out = 0.5 * (d.teacher.exp() - d.student.exp()).abs().sum(-1)
    return out if d.rest is None else out + 0.5 * d.rest


_PER_POSITION: dict[str, Callable[[_Dists, float], torch.Tensor]] = {
    "forward_kl": _forward_kl, "reverse_kl": _reverse_kl,
    "generalized_jsd": _generalized_jsd, "total_variation": _total_variation,
}


def divergence(name: str, student_logits: torch.Tensor, teacher: TeacherSignal,
               mask: torch.Tensor | None = None, temperature: float = 1.0, beta: float = 0.5,
               log_probs: bool = False) -> torch.Tensor:
    """D(teacher_T ‖ student_T) by name, averaged over the masked positions (fp32 scalar).

    `log_probs=True` (T = 1 only): `student_logits` already holds the student's log-probabilities."""
    name = _ALIASES.get(name, name)
    if name not in _PER_POSITION:
        raise ConfigError(f"distill.divergence: must be one of {', '.join(DIVERGENCES)}, got {name!r}")
    dists = _distributions(student_logits, teacher, mask, temperature, log_probs)
    per_position = _PER_POSITION[name](dists, beta)
    if per_position.numel() == 0:
        return student_logits.float().sum() * 0.0
    return per_position.mean()


def forward_kl(student_logits: torch.Tensor, teacher: TeacherSignal, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T ‖ p_S): mean over masked positions."""
    return divergence("forward_kl", student_logits, teacher, mask, temperature)


def reverse_kl(student_logits: torch.Tensor, teacher: TeacherSignal, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(p_S ‖ p_T): mean over masked positions."""
    return divergence("reverse_kl", student_logits, teacher, mask, temperature)


def generalized_jsd(student_logits: torch.Tensor, teacher: TeacherSignal, mask: torch.Tensor | None = None,
                    temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """β·KL(p_T ‖ M) + (1 − β)·KL(p_S ‖ M), M = β·p_T + (1 − β)·p_S (in log space); mean over positions."""
    return divergence("generalized_jsd", student_logits, teacher, mask, temperature, beta)


def total_variation(student_logits: torch.Tensor, teacher: TeacherSignal, mask: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """½·Σ|p_T − p_S|: mean over masked positions."""
    return divergence("total_variation", student_logits, teacher, mask, temperature)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hard-label cross-entropy in fp32, mean over the masked positions."""
    if not bool(mask.any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(_select(logits, mask).float(), targets[mask.to(targets.device)])


def distillation_loss(student_logits: torch.Tensor, teacher: TeacherSignal, targets: torch.Tensor,
                      cfg: DistillConfig, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """α·CE + (1 − α)·T²·D on positions where `targets` != IGNORE_INDEX (or `mask`); (loss, metrics).

    `teacher` is full logits [B, T, V'] (V' ≥ V allowed: padded rows are sliced off) or a `TopK` / (ids,
    logprobs) pair [B, T, k]. Metrics are detached fp32 scalars: ``ce``, ``kd`` (D itself, unscaled).
    """
    mask = targets != IGNORE_INDEX if mask is None else mask
    ce = masked_cross_entropy(student_logits, targets, mask)
    kd = divergence(cfg.divergence, student_logits, teacher, mask, cfg.temperature, cfg.beta)
    loss = cfg.alpha * ce + (1 - cfg.alpha) * cfg.temperature**2 * kd
    return loss, {"ce": ce.detach(), "kd": kd.detach()}


# ---- hidden states and attention ----------------------------------------------------------------
def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher block (0-based) for each student block: evenly spaced, the last onto the last (TinyBERT)."""
    return [(i + 1) * n_teacher // n_student - 1 for i in range(n_student)]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.device)
    return (values * mask).sum() / mask.sum().clamp_min(1)


class HiddenStateLoss(nn.Module):
    """MSE or cosine distance between mapped hidden states, through a learned projection if widths differ.

    One projection (student width → teacher width, no bias) is shared by every mapped layer, as in TinyBERT.
    Hidden-state lists are the model's `hidden_states`: embeddings first, then each block's output.
    """

    def __init__(self, student_dim: int, teacher_dim: int, n_student_layers: int, n_teacher_layers: int,
                 layer_map: list[int] | None = None, kind: str = "cosine") -> None:
        super().__init__()
        if kind not in ("cosine", "mse"):
            raise ConfigError(f"distill.hidden_loss: must be cosine or mse, got {kind!r}")
        if layer_map is None:
            layer_map = uniform_layer_map(n_student_layers, n_teacher_layers)
        if len(layer_map) != n_student_layers or not all(0 <= t < n_teacher_layers for t in layer_map):
            raise ConfigError(f"distill.layer_map: needs {n_student_layers} teacher block indices in "
                              f"[0, {n_teacher_layers}), got {layer_map}")
        self.kind, self.layer_map = kind, list(layer_map)
        self.proj = (nn.Identity() if student_dim == teacher_dim
                     else nn.Linear(student_dim, teacher_dim, bias=False))

    def forward(self, student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        losses = []
        for s_layer, t_layer in enumerate(self.layer_map):
            h_s = self.proj(student_hidden[s_layer + 1]).float()
            h_t = teacher_hidden[t_layer + 1].to(h_s.device).float()
            if self.kind == "mse":
                per_position = (h_s - h_t).pow(2).mean(-1)
            else:
                per_position = 1.0 - F.cosine_similarity(h_s, h_t, dim=-1)
            losses.append(_masked_mean(per_position, mask))
        return torch.stack(losses).mean()


def attention_transfer(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                       mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """MiniLM: KL(teacher ‖ student) of attention distributions [B, H, T, T], mean over heads and queries.

    Equal head counts compare head by head; otherwise both sides are first averaged over their heads (a mean
    of distributions is a distribution) and the head-averaged maps are compared. Student probabilities are
    floored at `eps` so a key the student cannot see costs a bounded penalty. `mask` [B, T] picks queries.
    """
    s, t = student_attn.float(), teacher_attn.to(student_attn.device).float()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    per_query = _kl(t.log(), s.clamp_min(eps).log()).mean(1)  # [B, T]
    return _masked_mean(per_query, mask)


# ---- vocabularies --------------------------------------------------------------------------------
def vocab_of(source: Any) -> dict[str, int]:
    """Token → id map of a FlashLM `Tokenizer`, `tokenizers.Tokenizer`, HF tokenizer, dict or path."""
    if isinstance(source, dict):
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        vocab = vocab_from_dir(source) if Path(source).is_dir() else _vocab_from_file(Path(source))
        if vocab is None:
            raise DataError(f"no tokenizer in {source}; pass a tokenizer.json or a directory holding one")
        return vocab
    backend = getattr(source, "backend", source)
    try:
        return dict(backend.get_vocab(with_added_tokens=True))
    except TypeError:
        return dict(backend.get_vocab())


def _vocab_from_file(path: Path) -> dict[str, int] | None:
    if not path.is_file():
        return None
    import tokenizers

    try:
        return tokenizers.Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"cannot read tokenizer {path}: {str(exc).splitlines()[0]}") from None


def vocab_from_dir(directory: str | os.PathLike) -> dict[str, int] | None:
    """The vocabulary of a model directory: its tokenizer.json, else an HF tokenizer there, else None."""
    vocab = _vocab_from_file(Path(directory) / TOKENIZER_FILE)
    if vocab is not None:
        return vocab
    try:
        from transformers import AutoTokenizer

        return dict(AutoTokenizer.from_pretrained(str(directory), local_files_only=True).get_vocab())
    except Exception:  # no tokenizer files there, or transformers missing
        return None


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    """sha256 of the sorted token → id map."""
    canonical = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_vocab(student: dict[str, int], teacher: dict[str, int], teacher_name: str = "the teacher") -> None:
    """Refuse (one-line FlashLMError naming the first differing ids) unless both maps are identical."""
    if student == teacher:
        return
    s_by_id, t_by_id = {i: t for t, i in student.items()}, {i: t for t, i in teacher.items()}
    differ = sorted(i for i in set(s_by_id) | set(t_by_id) if s_by_id.get(i) != t_by_id.get(i))
    shown = "; ".join(f"id {i}: student {s_by_id.get(i)!r}, teacher {t_by_id.get(i)!r}" for i in differ[:3])
    raise FlashLMError(f"{teacher_name} and the student use different tokenizers ({len(differ)} ids differ: "
                       f"{shown}); distill only between models that share a tokenizer")


# ---- teachers -------------------------------------------------------------------------------------
@dataclass
class TeacherOutput:
    logits: torch.Tensor  # [B, T, V] sliced to the teacher's vocabulary
    hidden_states: list[torch.Tensor] | None = None  # embeddings, then each block
    attentions: list[torch.Tensor] | None = None  # per layer [B, H, T, T]


class OnlineTeacher:
    """A frozen teacher run without gradients: a FlashLM (kind "flashlm") or an HF causal LM (kind "hf").

    HF teachers run causal attention only, ignore packed-document ids, and their last hidden state may come
    after the final norm (transformers' convention).
    """

    def __init__(self, model: nn.Module, kind: str = "flashlm", vocab: dict[str, int] | None = None,
                 source: str = "<in-memory>", tokenizer_file: Path | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.kind, self.vocab, self.source, self.tokenizer_file = kind, vocab, source, tokenizer_file
        self._text_cfg = None if kind == "flashlm" else _hf_text_config(model)

    def _dim(self, ours: str, theirs: str) -> int:
        cfg, name = (self.model.cfg, ours) if self.kind == "flashlm" else (self._text_cfg, theirs)
        return int(getattr(cfg, name))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        """Ids of the teacher's tokenizer (logits are sliced to this), else its logits width."""
        if self.vocab:
            return max(self.vocab.values()) + 1
        return self._dim("vocab_size", "vocab_size")

    @property
    def n_layers(self) -> int:
        return self._dim("n_layers", "num_hidden_layers")

    @property
    def d_model(self) -> int:
        return self._dim("d_model", "hidden_size")

    @property
    def max_seq_len(self) -> int:
        return self._dim("max_seq_len", "max_position_embeddings")

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, mode: str = "causal", prefix_len: torch.Tensor | None = None,
                 doc_ids: torch.Tensor | None = None, return_hidden_states: bool = False,
                 return_attentions: bool = False) -> TeacherOutput:
        input_ids = input_ids.to(self.device)
        if self.kind == "flashlm":
            out = self.model(input_ids, mode=mode, prefix_len=prefix_len,
                             doc_ids=None if doc_ids is None else doc_ids.to(self.device),
                             return_hidden_states=return_hidden_states,
                             return_attentions="last" if return_attentions else False)
            logits, hidden, attns = out.logits, out.hidden_states, out.attentions
        else:
            if mode != "causal":
                raise FlashLMError(f"HF teacher {self.source} runs causal attention only; "
                                   f"the batch asks for {mode!r}")
            out = self.model(input_ids=input_ids, output_hidden_states=return_hidden_states,
                             output_attentions=return_attentions, use_cache=False)
            logits = out.logits
            hidden = list(out.hidden_states) if return_hidden_states else None
            attns = list(out.attentions) if return_attentions and out.attentions is not None else None
            if return_attentions and not attns:
                raise FlashLMError(f"HF teacher {self.source} returned no attentions; "
                                   "load it with need_attentions=True")
        return TeacherOutput(logits[..., : self.vocab_size], hidden, attns)


def _hf_text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


class CachedTeacher:
    """A teacher read from a `LogitCache`: top-k ids and log-probs for windows given by stream offsets."""

    def __init__(self, cache: LogitCache | str | os.PathLike) -> None:
        self.cache = cache if isinstance(cache, LogitCache) else LogitCache(cache)
        self.source = str(self.cache.path)

    @property
    def vocab(self) -> dict[str, int] | None:
        return self.cache.vocab

    @property
    def vocab_size(self) -> int:
        return self.cache.vocab_size

    def __call__(self, starts: np.ndarray | torch.Tensor, length: int,
                 device: torch.device | str = "cpu") -> TopK:
        """`TopK` [B, length, k] for the windows starting at `starts` (stream offsets), on `device`."""
        if isinstance(starts, torch.Tensor):
            starts = starts.cpu().numpy()
        ids, logprobs = self.cache.lookup(np.asarray(starts), length)
        ids_t = torch.from_numpy(ids).to(device, non_blocking=True).long()
        lp_t = torch.from_numpy(logprobs).to(device, non_blocking=True).float()
        return TopK(ids_t, lp_t, self.cache.vocab_size)


def teacher_kind(path: str | os.PathLike) -> str:
    """"cache", "flashlm" or "hf" for a teacher directory; CheckpointError when it is none of those."""
    path = Path(path)
    if (path / CACHE_META).is_file() and _read_json(path / CACHE_META).get("format") == CACHE_FORMAT:
        return "cache"
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path}: not a teacher (no config.json and no logit cache); pass a FlashLM "
                              "checkpoint, a local transformers model dir or a `flashlm distill cache` dir")
    data = _read_json(config)
    if data.get("architecture") == "FlashLM":
        return "flashlm"
    if "model_type" in data:
        return "hf"
    raise CheckpointError(f"{config}: neither a FlashLM nor a transformers config (no model_type)")


def load_teacher(path: str | os.PathLike, device: str | torch.device | None = None,
                 student_tokenizer: Any = None,
                 need_attentions: bool = False) -> OnlineTeacher | CachedTeacher:
    """Load a teacher (FlashLM dir, local HF causal-LM dir, or a logit cache) and check its vocabulary.

    Online teachers go to `device` (default CUDA when available), in bf16 on CUDA, frozen, in eval mode.
    `student_tokenizer` (anything `vocab_of` reads): when given, the teacher's vocabulary must equal it.
    `need_attentions` loads HF teachers with eager attention so they can return attention maps.
    """
    kind = teacher_kind(path)
    if kind == "cache":
        teacher: OnlineTeacher | CachedTeacher = CachedTeacher(path)
    else:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = (FlashLM.from_pretrained(path, device=device, dtype=dtype) if kind == "flashlm"
                 else _load_hf_model(Path(path), device, dtype, need_attentions))
        tok_file = Path(path) / TOKENIZER_FILE
        teacher = OnlineTeacher(model, kind, vocab_from_dir(path), str(path),
                                tok_file if tok_file.is_file() else None)
    if student_tokenizer is not None:
        _check_student_vocab(teacher, vocab_of(student_tokenizer), str(path))
    return teacher


def _check_student_vocab(teacher: OnlineTeacher | CachedTeacher, student: dict[str, int], path: str) -> None:
    if teacher.vocab is not None:
        check_vocab(student, teacher.vocab, f"teacher {path}")
        return
    stored = teacher.cache.meta.get("tokenizer_fingerprint") if isinstance(teacher, CachedTeacher) else None
    if stored is None:
        raise FlashLMError(f"teacher {path} has no tokenizer to compare with the student's; "
                           "put its tokenizer.json next to its weights")
    if stored != vocab_fingerprint(student):
        raise FlashLMError(f"teacher {path} and the student use different tokenizers (the cache's vocabulary "
                           "fingerprint differs); distill only between models that share a tokenizer")


def _load_hf_model(path: Path, device: torch.device, dtype: torch.dtype, need_attentions: bool) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise FlashLMError("HF teachers need `transformers`; "
                           "install it with `pip install 'transformers>=4.50'`") from None
    v5 = int(transformers.__version__.split(".")[0]) >= 5
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False,
                              ("dtype" if v5 else "torch_dtype"): dtype}
    if need_attentions:
        kwargs["attn_implementation"] = "eager"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load as a transformers causal LM ({first})") from None
    return model.to(device)


# ---- the objective -------------------------------------------------------------------------------
def _extra(batch: Any, name: str, default: Any = None) -> Any:
    extras = getattr(batch, "extras", None) or {}
    return extras.get(name, getattr(batch, name, default))


def _unwrap(model: nn.Module) -> nn.Module:
    """The FlashLM inside DDP / torch.compile / recording wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


class _Recorder:
    """Stands in for the student when the base objective runs it: asks for what the distillation terms need
    (hidden states, last-layer attention) and keeps the output, so the student runs once per micro-batch."""

    def __init__(self, model: nn.Module, hidden_states: bool, attentions: bool) -> None:
        self.module, self.hidden_states, self.attentions = model, hidden_states, attentions
        self.out: LMOutput | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> LMOutput:
        if self.hidden_states:
            kwargs["return_hidden_states"] = True
        if self.attentions:
            kwargs["return_attentions"] = "last"
        self.out = self.module(*args, **kwargs)
        return self.out


class DistillObjective(nn.Module):
    """The per-step distillation loss. Its parameters (the hidden-state projection, if any) are trained and
    checkpointed with the student's: the loop puts them in the optimizer and in ``train_state``.

    Two forms:

    - **standalone** (``base=None``): ``objective(model, batch)`` runs the student and returns
      ``α·CE + (1 − α)·T²·D`` [+ extras] with metrics distill_{loss, ce, kd} (+ distill_hidden, distill_attn).
    - **around an objective** (``base``, how `flashlm.train` uses it): the base objective's loss runs as usual
      (CLM, masked LM, NSP, prefix LM or their hybrid; its metrics are kept) and is the hard-label term:
      ``α·base + (1 − α)·T²·D`` on the positions the base trains, the teacher seeing the same input in the
      same attention mode. Batches the teacher cannot score (a cached or HF teacher and a non-causal batch;
      a cached teacher and a batch without stream offsets) train on the base loss alone, their distill_*
      metrics NaN. Metrics added: distill_kd (+ distill_hidden, distill_attn).

    The batch carries ``input_ids``, ``targets`` (IGNORE_INDEX where untrained), ``mode``, ``doc_ids``,
    ``prefix_len`` and, for a cached teacher, ``extras["starts"]``: the stream offset of each row's first
    input token (row b's inputs are ``tokens[s_b : s_b + T]``).
    """

    def __init__(self, cfg: DistillConfig, teacher: OnlineTeacher | CachedTeacher, student_cfg: ModelConfig,
                 base: Any = None, init_from: str | None = None) -> None:
        super().__init__()
        cfg.validate()
        cached = isinstance(teacher, CachedTeacher)
        if cached and (cfg.hidden_weight > 0 or cfg.attention_weight > 0):
            raise ConfigError("distill.hidden_weight/attention_weight: a cached teacher has no hidden states "
                              "or attentions; set them to 0 or use an online teacher")
        self.cfg, self.teacher, self.base, self.init_from = cfg, teacher, base, init_from
        self.hidden = None
        if cfg.hidden_weight > 0:
            self.hidden = HiddenStateLoss(student_cfg.d_model, teacher.d_model, student_cfg.n_layers,
                                          teacher.n_layers, cfg.layer_map, cfg.hidden_loss)

    @property
    def needs_hidden_states(self) -> bool:
        return self.cfg.hidden_weight > 0

    @property
    def needs_attentions(self) -> bool:
        return self.cfg.attention_weight > 0

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.base is not None:
            return self._around_base(model, batch)
        out = model(batch.input_ids, mode=batch.mode, doc_ids=batch.doc_ids, prefix_len=batch.prefix_len,
                    return_hidden_states=self.needs_hidden_states,
                    return_attentions="last" if self.needs_attentions else False)
        return self.loss(out, batch)

    def as_objective(self, name: str = "distill") -> Any:
        """This loss with `distill_batch` as a `flashlm.train.objectives.Objective` for the loop."""
        from flashlm.train.objectives import Objective

        return Objective(name, distill_batch, self)

    def init_student(self, model: FlashLM) -> None:
        """With ``student_init: teacher``, overwrite `model`'s weights with every k-th teacher layer (the
        teacher read in fp32 from its checkpoint); a no-op otherwise. The loop calls it before wrapping."""
        if self.cfg.student_init != "teacher":
            return
        if not self.init_from:
            raise ConfigError("distill.student_init: teacher initialisation needs a FlashLM teacher "
                              "checkpoint")
        teacher = FlashLM.from_pretrained(self.init_from)
        state = init_student_from_teacher(teacher, model.cfg).state_dict()
        model.load_state_dict(state)

    def can_distill(self, batch: Any) -> bool:
        """Whether the teacher can score this batch (see the class docstring)."""
        causal = _extra(batch, "mode", "causal") == "causal"
        if isinstance(self.teacher, CachedTeacher):
            return causal and _extra(batch, "starts") is not None
        return causal or self.teacher.kind == "flashlm"

    def teacher_output(self, batch: Any, device: torch.device) -> tuple[TeacherSignal, TeacherOutput | None]:
        """The teacher's signal for `batch` (logits or TopK), plus the online teacher's full output."""
        if isinstance(self.teacher, CachedTeacher):
            starts = _extra(batch, "starts")
            if starts is None:
                raise DataError("a cached teacher needs each row's stream offset in batch.extras['starts']")
            return self.teacher(starts, batch.input_ids.shape[1], device), None
        out = self.teacher(batch.input_ids, mode=_extra(batch, "mode", "causal"),
                           prefix_len=_extra(batch, "prefix_len"), doc_ids=_extra(batch, "doc_ids"),
                           return_hidden_states=self.needs_hidden_states,
                           return_attentions=self.needs_attentions)
        return out.logits, out

    def loss(self, student_out: LMOutput, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and detached metrics distill_{loss, ce, kd} (+ distill_hidden, distill_attn)."""
        targets = batch.targets
        mask = targets != IGNORE_INDEX
        signal, t_out = self.teacher_output(batch, student_out.logits.device)
        loss, parts = distillation_loss(student_out.logits, signal, targets, self.cfg, mask)
        metrics = {f"distill_{k}": v for k, v in parts.items()}
        loss, extras = self._extras(loss, student_out, t_out, mask)
        metrics.update(extras)
        metrics["distill_loss"] = loss.detach()
        return loss, metrics

    def _extras(self, loss: torch.Tensor, student_out: LMOutput, t_out: TeacherOutput | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        metrics = {}
        if self.hidden is not None:
            h = self.hidden(student_out.hidden_states, t_out.hidden_states, mask)
            loss, metrics["distill_hidden"] = loss + self.cfg.hidden_weight * h, h.detach()
        if self.needs_attentions:
            a = attention_transfer(student_out.attentions[-1], t_out.attentions[-1], mask)
            loss, metrics["distill_attn"] = loss + self.cfg.attention_weight * a, a.detach()
        return loss, metrics

    def _metric_names(self) -> list[str]:
        names = ["distill_kd"] + ["distill_hidden"] * (self.hidden is not None)
        return names + ["distill_attn"] * self.needs_attentions

    def _around_base(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from flashlm.train.objectives import clm_loss

        if self.base.loss is clm_loss and self.cfg.temperature == 1.0 and self.can_distill(batch):
            return self._fused_clm(model, batch)
        recorder = _Recorder(model, self.needs_hidden_states, self.needs_attentions)
        hard, metrics = self.base.loss(recorder, batch)
        out = recorder.out
        if out is None or not self.can_distill(batch):
            nan = torch.full((), float("nan"), device=hard.device)
            return hard, {**metrics, **dict.fromkeys(self._metric_names(), nan)}
        mask = batch.targets != IGNORE_INDEX
        signal, t_out = self.teacher_output(batch, hard.device)
        kd = self._divergence(model, out, signal, mask)
        loss = self.cfg.alpha * hard + (1 - self.cfg.alpha) * self.cfg.temperature**2 * kd
        loss, extras = self._extras(loss, out, t_out, mask)
        return loss, {**metrics, "distill_kd": kd.detach(), **extras}

    def _fused_clm(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The CLM objective plus distillation at T = 1, both from one log-softmax of the student's logits
        (equal to running `clm_loss` and `divergence` separately, at about the cost of `clm_loss` alone)."""
        out = model(batch.input_ids, mode=batch.mode, doc_ids=batch.doc_ids, prefix_len=batch.prefix_len,
                    return_hidden_states=self.needs_hidden_states,
                    return_attentions="last" if self.needs_attentions else False)
        logits, targets = out.logits, batch.targets
        log_probs = logits.float().log_softmax(-1)
        ce = F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        valid = targets != IGNORE_INDEX
        with torch.no_grad():
            accuracy = ((logits.argmax(-1) == targets) & valid).sum() / valid.sum().clamp(min=1)
        signal, t_out = self.teacher_output(batch, logits.device)
        use = None if bool(valid.all()) else valid
        kd = divergence(self.cfg.divergence, log_probs, signal, use, 1.0, self.cfg.beta, log_probs=True)
        loss = self.cfg.alpha * ce + (1 - self.cfg.alpha) * kd
        loss, extras = self._extras(loss, out, t_out, valid)
        return loss, {"clm_loss": ce.detach(), "clm_acc": accuracy.float(), "distill_kd": kd.detach(), **extras}

    def _divergence(self, model: nn.Module, out: LMOutput, signal: TeacherSignal,
                    mask: torch.Tensor) -> torch.Tensor:
        """D on the trained positions; when the base ran the LM head on those positions only (masked LM),
        the head runs on them again here (the hidden states are shared, so only the head's cost repeats)."""
        cfg = self.cfg
        if out.logits is not None:
            use = None if bool(mask.all()) else mask
            return divergence(cfg.divergence, out.logits, signal, use, cfg.temperature, cfg.beta)
        logits = _unwrap(model).logits(out.hidden[mask])
        if isinstance(signal, tuple):
            signal = TopK(*signal)
        if isinstance(signal, TopK):
            signal = TopK(_select(signal.ids, mask), _select(signal.logprobs, mask), signal.vocab_size)
        else:
            signal = _select(signal, mask)
        return divergence(cfg.divergence, logits, signal, None, cfg.temperature, cfg.beta)


def distill_batch(stream: Any, slot: Any, cfg: TrainConfig) -> Any:
    """The causal-LM micro-batch (a `BatchFn`) with each row's stream offset in ``extras["starts"]``.

    It draws exactly the windows the "clm" objective draws: a distilled and a plain run see the same tokens.
    """
    from flashlm.data.batches import causal_batch, random_starts, stream_id

    starts = random_starts(len(stream), cfg.seq_len + 1, slot, stream_id("clm"))
    batch = causal_batch(stream, starts, cfg.seq_len, cfg.packed_attention)
    batch.extras["starts"] = torch.from_numpy(np.asarray(starts, dtype=np.int64))
    return batch


def _with_starts(make_batch: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap another objective's batch maker (a hybrid's): its causal-LM batches get ``extras["starts"]``
    (recomputed as the "clm" objective draws them, and checked against the batch), so a cached teacher can
    score them; other batches pass unchanged."""
    from flashlm.data.batches import random_starts, read_windows, stream_id

    def make(stream: Any, slot: Any, cfg: TrainConfig) -> Any:
        batch = make_batch(stream, slot, cfg)
        if batch.mode == "causal" and batch.prefix_len is None and "starts" not in batch.extras:
            starts = random_starts(len(stream), cfg.seq_len + 1, slot, stream_id("clm"))
            if np.array_equal(read_windows(stream.tokens, starts, cfg.seq_len), batch.input_ids.numpy()):
                batch.extras["starts"] = torch.from_numpy(np.asarray(starts, dtype=np.int64))
        return batch

    return make


# ---- the loop's objective ----------------------------------------------------------------------------
def distill_objective(cfg: Any, base: Any, data: Any, device: torch.device | str = "cpu",
                      is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> Any:
    """The objective `flashlm.train` uses for a run with a `distill:` section.

    `base` is the run's own objective (train.objective or the hybrid of train.objectives); the result keeps
    its batches and frozen parameters and adds the distillation terms (`DistillObjective` around `base`).
    The teacher is loaded on `device` and checked against the run's tokenizer (`data.tokenizer_file`: the
    shards' tokenizer.json or train.tokenizer); with ``distill.cache`` the top-k cache is used, built first
    from ``distill.teacher`` over train.data (rank 0 builds, the others wait at `barrier`) when missing.
    """
    from flashlm.train.objectives import Objective

    dcfg: DistillConfig = cfg.distill
    tok_file = data.tokenizer_file
    if tok_file is None:
        raise ConfigError("distill: the student's tokenizer is unknown (no tokenizer.json in train.data and "
                          "train.tokenizer unset); set train.tokenizer so the teacher's vocabulary can be "
                          "checked")
    source = dcfg.teacher
    if dcfg.cache:
        source = _ensure_cache(dcfg, cfg.train, device, is_main, barrier, tok_file)
    teacher = load_teacher(source, device, student_tokenizer=tok_file,
                           need_attentions=dcfg.attention_weight > 0)
    cached = isinstance(teacher, CachedTeacher)
    if cached:
        _check_cache_fits(teacher.cache, data.train)
    init_from = _init_source(teacher) if dcfg.student_init == "teacher" else None
    with torch.random.fork_rng(devices=[]):  # the projection's initial weights depend on train.seed alone
        torch.manual_seed(cfg.train.seed)
        loss = DistillObjective(dcfg, teacher, cfg.model, base=base, init_from=init_from)
    make_batch = base.make_batch
    if base.name == "clm":
        make_batch = distill_batch
    elif cached:
        make_batch = _with_starts(base.make_batch)
    return Objective("distill", make_batch, loss, base.frozen)


def _ensure_cache(dcfg: DistillConfig, tcfg: TrainConfig, device: torch.device | str, is_main: bool,
                  barrier: Callable[[], None], tok_file: Path) -> str:
    out = Path(dcfg.cache)
    meta = _read_json(out / CACHE_META) if (out / CACHE_META).is_file() else {}
    if not meta.get("complete"):
        if not dcfg.teacher:
            raise ConfigError(f"distill.cache: no finished cache at {out} and no distill.teacher to build it "
                              "from")
        if is_main:
            teacher = load_teacher(dcfg.teacher, device, student_tokenizer=tok_file)
            if isinstance(teacher, CachedTeacher):
                raise ConfigError(f"distill.teacher: {dcfg.teacher} is itself a logit cache; to build "
                                  f"distill.cache={out}, point distill.teacher at a model")
            build_logit_cache(teacher, tcfg.data, out, top_k=dcfg.top_k, seq_len=min(tcfg.seq_len,
                              teacher.max_seq_len), batch_size=tcfg.batch_size, progress=True)
            del teacher
        barrier()
    return str(out)


def _check_cache_fits(cache: LogitCache, stream: Any) -> None:
    if cache.n_positions != len(stream) or cache.meta.get("split", "train") != "train":
        raise DataError(f"distill.teacher: the cache {cache.path} covers {cache.n_positions:,} positions of "
                        f"split {cache.meta.get('split')!r} but train.data's train split has {len(stream):,} "
                        "tokens; build the cache from the same shards (`flashlm distill cache`)")


def _init_source(teacher: OnlineTeacher | CachedTeacher) -> str:
    if isinstance(teacher, OnlineTeacher):
        path, kind = teacher.source, teacher.kind
    else:
        path, kind = str(teacher.cache.meta.get("teacher", "")), None
        try:
            kind = teacher_kind(path) if path and Path(path).is_dir() else None
        except CheckpointError:
            kind = None
    if kind != "flashlm":
        raise ConfigError(f"distill.student_init: teacher initialisation needs a FlashLM teacher checkpoint, "
                          f"and {path or 'the cache'} is not one; use student_init: scratch")
    return path


def distill_student(teacher: str | os.PathLike, shards: str | os.PathLike, student: ModelConfig | str,
                    steps: int, out: str | os.PathLike, **settings: Any) -> dict[str, Any]:
    """Distil `teacher` (a FlashLM or HF model dir, or a logit cache) into a new `student` (a ModelConfig or a
    preset name) on the token shards `shards`; returns `flashlm.train`'s summary.

    `settings` are ``section__key=value`` overrides, e.g. ``distill__alpha=0.3, train__batch_size=8``
    (a bare key means a distill key: ``alpha=0.3``). Equivalent to `flashlm.train` on a RunConfig with a
    ``distill:`` section, which is what this builds.
    """
    from flashlm.config import RunConfig, apply_overrides, get_preset
    from flashlm.train.loop import train

    model = get_preset(student) if isinstance(student, str) else student
    data = {"model": model.to_dict(),
            "train": {"data": str(shards), "out": str(out), "steps": steps, "seq_len": min(256, model.max_seq_len)},
            "distill": {"teacher": str(teacher)}}
    overrides = []
    for key, value in settings.items():
        section, _, name = key.rpartition("__")
        overrides.append(f"{section or 'distill'}.{name}={json.dumps(value)}")
    return train(RunConfig.from_dict(apply_overrides(data, overrides)))


# ---- student initialisation -----------------------------------------------------------------------
_SHAPE_FIELDS = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "flavour", "qk_norm",
                 "tie_embeddings")


def init_student_from_teacher(teacher_model: FlashLM | OnlineTeacher, student_cfg: ModelConfig,
                              layers: list[int] | None = None) -> FlashLM:
    """A student whose blocks copy every k-th teacher block (k = teacher layers // student layers, DistilBERT
    style; or `layers`), plus the teacher's embeddings, final norm and heads. Widths must match.

    Local/global attention, windows and RoPE bases follow the student's own `layer_pattern`.
    """
    model = teacher_model.model if isinstance(teacher_model, OnlineTeacher) else teacher_model
    if not isinstance(model, FlashLM):
        raise ConfigError("distill.student_init: teacher initialisation needs a FlashLM teacher; "
                          "convert HF models with `flashlm import hf` first")
    t_cfg = model.cfg
    diffs = [f"{k} {getattr(student_cfg, k)} vs {getattr(t_cfg, k)}" for k in _SHAPE_FIELDS
             if getattr(student_cfg, k) != getattr(t_cfg, k)]
    if diffs:
        raise ConfigError(f"distill.student_init: the student cannot copy the teacher ({'; '.join(diffs)}); "
                          "match the widths or initialise from scratch")
    if student_cfg.n_layers > t_cfg.n_layers:
        raise ConfigError(f"distill.student_init: the student has {student_cfg.n_layers} layers, more than "
                          f"the teacher's {t_cfg.n_layers}")
    step = t_cfg.n_layers // student_cfg.n_layers
    layers = list(layers) if layers is not None else [i * step for i in range(student_cfg.n_layers)]
    student = FlashLM(student_cfg)
    source = model.state_dict()
    state = {name: source[_teacher_name(name, layers)].detach().clone().float()
             for name in student.state_dict()}
    student.load_state_dict(state)
    return student


def _teacher_name(name: str, layers: list[int]) -> str:
    if not name.startswith("layers."):
        return name
    _, idx, rest = name.split(".", 2)
    return f"layers.{layers[int(idx)]}.{rest}"


# ---- the logit cache -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


class LogitCache:
    """A finished top-k cache: per stream position, the teacher's top-k ids and log-probs (memory-mapped)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory)
        if not (self.path / CACHE_META).is_file():
            raise DataError(f"{self.path}: no logit cache here; build one with `flashlm distill cache`")
        self.meta = _read_json(self.path / CACHE_META)
        if self.meta.get("format") != CACHE_FORMAT or self.meta.get("version") != CACHE_VERSION:
            raise DataError(f"{self.path}: not a version-{CACHE_VERSION} FlashLM logit cache")
        if not self.meta.get("complete"):
            done = _read_json(self.path / CACHE_PROGRESS).get("positions", 0) if (
                self.path / CACHE_PROGRESS).is_file() else 0
            raise DataError(f"{self.path}: the cache is incomplete ({done}/{self.n_positions} positions); "
                            "rerun `flashlm distill cache` with the same arguments to finish it")
        shape = (self.n_positions, self.top_k)
        meta = self.meta
        self.ids = _open_array(self.path / CACHE_IDS, np.dtype(meta["ids_dtype"]), shape, "r")
        self.logprobs = _open_array(self.path / CACHE_LOGPROBS, np.dtype(meta["logprobs_dtype"]), shape, "r")

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def seq_len(self) -> int:
        """The teacher's window length when the cache was built."""
        return int(self.meta["seq_len"])

    @property
    def stride(self) -> int:
        """How far the teacher's windows advanced (each position had >= seq_len − stride tokens of context)."""
        return int(self.meta.get("stride", self.seq_len))

    @property
    def n_positions(self) -> int:
        return int(self.meta["n_positions"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes per stream position: k·(id bytes + 2)."""
        return int(self.meta["bytes_per_token"])

    def __len__(self) -> int:
        return self.n_positions

    @property
    def vocab(self) -> dict[str, int] | None:
        """The teacher's vocabulary (from the tokenizer.json copied into the cache), if it had one."""
        return _vocab_from_file(self.path / TOKENIZER_FILE)

    def lookup(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows of `length` positions from each stream offset in `starts`: ids (int32) and log-probs
        (float16), each [len(starts), length, k]. Position s + j predicts stream token s + j + 1."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if len(starts) and (starts.min() < 0 or starts.max() + length > self.n_positions):
            raise DataError(f"{self.path}: windows [{starts.min()}, {starts.max() + length}) run past the "
                            f"cache's {self.n_positions} positions; built from other shards or split?")
        index = starts[:, None] + np.arange(length, dtype=np.int64)
        return self.ids[index].astype(np.int32), np.asarray(self.logprobs[index])


def _open_array(path: Path, dtype: np.dtype, shape: tuple[int, int], mode: str) -> np.ndarray:
    if mode == "r" and (not path.is_file() or path.stat().st_size != shape[0] * shape[1] * dtype.itemsize):
        raise DataError(f"{path} is missing or has the wrong size; rebuild the cache")
    if shape[0] * shape[1] == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)


def _token_stream(shards: str | os.PathLike | np.ndarray, split: str) -> tuple[np.ndarray, str]:
    if isinstance(shards, np.ndarray):
        return shards.reshape(-1), "<array>"
    from flashlm.data.shards import TokenShards

    return TokenShards(shards, split).tokens, str(Path(shards).resolve())


def _cache_meta(teacher: OnlineTeacher, source: str, split: str, n: int, top_k: int, seq_len: int,
                stride: int) -> dict:
    id_dtype = ids_dtype(teacher.vocab_size)
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "top_k": top_k, "seq_len": seq_len, "stride": stride,
        "n_positions": n, "vocab_size": teacher.vocab_size, "ids_dtype": id_dtype.name,
        "logprobs_dtype": "float16", "bytes_per_token": top_k * (id_dtype.itemsize + 2),
        "teacher": teacher.source, "shards": source, "split": split,
        "tokenizer_fingerprint": vocab_fingerprint(teacher.vocab) if teacher.vocab else None,
        "complete": False,
    }


def _start_or_resume(out: Path, meta: dict, teacher: OnlineTeacher) -> int:
    """Positions already cached in `out` (0 for a fresh cache); refuses a cache built differently."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / CACHE_META
    if meta_path.is_file():
        old = _read_json(meta_path)
        settings = {k: v for k, v in old.items() if k != "complete"}
        if settings != {k: v for k, v in meta.items() if k != "complete"}:
            changed = [k for k in meta if k != "complete" and old.get(k) != meta[k]]
            raise DataError(f"{out} holds a cache built with other settings ({', '.join(changed)}); "
                            "choose another output directory or delete it")
        if old.get("complete"):
            return meta["n_positions"]
        if (out / CACHE_PROGRESS).is_file() and _arrays_present(out, meta):
            return int(_read_json(out / CACHE_PROGRESS).get("positions", 0))
    _write_json(meta_path, meta)
    if teacher.tokenizer_file is not None:
        shutil.copyfile(teacher.tokenizer_file, out / TOKENIZER_FILE)
    shape = (meta["n_positions"], meta["top_k"])
    for name, dtype in ((CACHE_IDS, meta["ids_dtype"]), (CACHE_LOGPROBS, meta["logprobs_dtype"])):
        _open_array(out / name, np.dtype(dtype), shape, "w+")
    _write_json(out / CACHE_PROGRESS, {"positions": 0})
    return 0


def _arrays_present(out: Path, meta: dict) -> bool:
    n = meta["n_positions"] * meta["top_k"]
    return all((out / name).is_file() and (out / name).stat().st_size == n * np.dtype(dtype).itemsize
               for name, dtype in ((CACHE_IDS, meta["ids_dtype"]), (CACHE_LOGPROBS, meta["logprobs_dtype"])))


def _teacher_topk(teacher: OnlineTeacher, tokens: np.ndarray, start: int, stop: int, seq_len: int,
                  stride: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids, fp16 log-probs) [stop − start, k] for stream positions [start, stop), `start` a multiple of
    `stride`: the block [p, p + stride) is read by the window ``tokens[max(0, p + stride − seq_len) : p +
    stride]``, one window a row (right-padded: causal attention never looks ahead)."""
    blocks = range(start, stop, stride)
    rows = np.zeros((len(blocks), seq_len), dtype=np.int64)
    keep = []
    for row, p in enumerate(blocks):
        lo, end = max(0, p + stride - seq_len), min(p + stride, stop)
        rows[row, : end - lo] = tokens[lo:end]
        keep.append((row, p - lo, end - p))
    logprobs = teacher(torch.from_numpy(rows)).logits.float().log_softmax(-1)
    values, indices = logprobs.topk(top_k, dim=-1)
    values = values.clamp_min(torch.finfo(torch.float16).min)
    ids = torch.cat([indices[r, o : o + c] for r, o, c in keep])
    lps = torch.cat([values[r, o : o + c] for r, o, c in keep])
    return ids.cpu().numpy(), lps.half().cpu().numpy()


@contextmanager
def _progress_bar(enabled: bool, total: int, done: int) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("caching teacher logits"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("tokens"), TimeRemainingColumn()) as bar:
        task = bar.add_task("cache", total=total, completed=done)
        yield lambda n: bar.advance(task, n)


def build_logit_cache(teacher: OnlineTeacher, shards: str | os.PathLike | np.ndarray,
                      out_dir: str | os.PathLike, top_k: int = 64, seq_len: int | None = None,
                      batch_size: int = 8, split: str = "train", progress: bool = True,
                      stride: int | None = None) -> LogitCache:
    """Run `teacher` once over a token stream and store each position's top-k ids and log-probs.

    `shards` is a shard directory (its `split`) or a 1-D token array. The teacher reads windows of `seq_len`
    tokens (default: its context, at most 2048) advancing by `stride` (default ``seq_len // 2``; `seq_len` for
    consecutive windows at half the cost), `batch_size` windows a chunk; after each chunk the arrays are
    flushed and ``progress.json`` records the positions done, so a rerun with the same arguments continues
    where an interrupted one stopped (and yields the same bytes).
    Files: ids.bin [N, k] (uint16 when the vocabulary fits, else int32), logprobs.bin [N, k] float16,
    meta.json (with ``bytes_per_token`` = k·(id bytes + 2), 256 for k = 64), tokenizer.json.
    """
    tokens, source = _token_stream(shards, split)
    seq_len = seq_len or min(teacher.max_seq_len, 2048)
    if seq_len > teacher.max_seq_len:
        raise ConfigError(f"seq_len {seq_len} exceeds the teacher's context of {teacher.max_seq_len} tokens")
    if not 0 < top_k <= teacher.vocab_size:
        raise ConfigError(f"top_k must be in [1, {teacher.vocab_size}] (the vocabulary), got {top_k}")
    stride = stride or max(1, seq_len // 2)
    if not 0 < stride <= seq_len:
        raise ConfigError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    out = Path(out_dir)
    meta = _cache_meta(teacher, source, split, len(tokens), top_k, seq_len, stride)
    done = _start_or_resume(out, meta, teacher)
    if done < meta["n_positions"]:
        _fill_cache(teacher, tokens, out, meta, done, batch_size, progress)
    meta["complete"] = True
    _write_json(out / CACHE_META, meta)
    return LogitCache(out)


def cache_teacher(teacher: str | os.PathLike, shards: str | os.PathLike, out_dir: str | os.PathLike,
                  top_k: int = 64, seq_len: int | None = None, batch_size: int = 8, split: str = "train",
                  device: str | torch.device | None = None, progress: bool = True,
                  stride: int | None = None) -> LogitCache:
    """`flashlm distill cache`: load the teacher (FlashLM or local HF dir), check that it shares the shards'
    tokenizer, and build (or finish) its top-k cache over the shards' `split` (see `build_logit_cache`)."""
    from flashlm.data.shards import TokenShards
    from flashlm.tokenizer import Tokenizer

    model = load_teacher(teacher, device)
    if isinstance(model, CachedTeacher):
        raise ConfigError(f"{teacher} is already a logit cache; pass the teacher model's directory")
    shard_tok = Path(shards) / TOKENIZER_FILE
    if shard_tok.is_file():
        _check_student_vocab(model, vocab_of(shard_tok), str(teacher))
    elif model.tokenizer_file is not None:
        TokenShards(shards, split).check_tokenizer(Tokenizer.load(model.tokenizer_file))
    else:
        raise FlashLMError(f"cannot check that teacher {teacher} shares the tokenizer of {shards}: neither "
                           "has a tokenizer.json; put the tokenizer next to the teacher's weights")
    return build_logit_cache(model, shards, out_dir, top_k, seq_len, batch_size, split, progress, stride)


def _fill_cache(teacher: OnlineTeacher, tokens: np.ndarray, out: Path, meta: dict, done: int, batch_size: int,
                progress: bool) -> None:
    n, k, seq_len, stride = meta["n_positions"], meta["top_k"], meta["seq_len"], meta["stride"]
    ids_mm = _open_array(out / CACHE_IDS, np.dtype(meta["ids_dtype"]), (n, k), "r+")
    lp_mm = _open_array(out / CACHE_LOGPROBS, np.dtype(meta["logprobs_dtype"]), (n, k), "r+")
    chunk = stride * batch_size
    with _progress_bar(progress, n, done) as advance:
        for start in range(done, n, chunk):
            stop = min(start + chunk, n)
            ids, logprobs = _teacher_topk(teacher, tokens, start, stop, seq_len, stride, k)
            ids_mm[start:stop], lp_mm[start:stop] = ids, logprobs
            ids_mm.flush()
            lp_mm.flush()
            _write_json(out / CACHE_PROGRESS, {"positions": stop})
            advance(stop - start)


__all__ = [
    "DIVERGENCES", "CachedTeacher", "DistillConfig", "DistillObjective", "HiddenStateLoss", "LogitCache",
    "OnlineTeacher", "TeacherOutput", "TopK", "attention_transfer", "build_logit_cache", "cache_teacher",
    "check_vocab", "distill_batch", "distill_objective", "distill_student", "distillation_loss", "divergence",
    "forward_kl", "generalized_jsd", "init_student_from_teacher", "load_teacher", "masked_cross_entropy",
    "reverse_kl", "teacher_kind", "total_variation", "uniform_layer_map", "vocab_fingerprint", "vocab_of",
]

"""Distillation losses: the divergences, the KD loss, hidden-state and attention-transfer terms.

`distillation_loss` is ``α·CE(student, hard labels) + (1 − α)·T²·D(teacher_T ‖ student_T)`` on the trained
positions, in fp32, with ``p_T = softmax(z/T)`` on both sides and D one of forward KL, reverse KL, generalised
JSD(β) or total variation. The teacher is either full logits or a `TopK` pair (ids, log-probs) from a cache.
Everything here takes tensors: no teacher model, cache or file is involved.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashlm.config import DIVERGENCE_ALIASES, DIVERGENCES, DistillConfig
from flashlm.data.batches import IGNORE_INDEX
from flashlm.errors import ConfigError

_ALIASES = DIVERGENCE_ALIASES


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


def _distributions(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    mask: torch.Tensor | None,
    temperature: float,
    log_probs: bool = False,
) -> _Dists:
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
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "generalized_jsd": _generalized_jsd,
    "total_variation": _total_variation,
}


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    log_probs: bool = False,
) -> torch.Tensor:
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


def forward_kl(
    student_logits: torch.Tensor, teacher: TeacherSignal, mask: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p_T ‖ p_S): mean over masked positions."""
    return divergence("forward_kl", student_logits, teacher, mask, temperature)


def reverse_kl(
    student_logits: torch.Tensor, teacher: TeacherSignal, mask: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p_S ‖ p_T): mean over masked positions."""
    return divergence("reverse_kl", student_logits, teacher, mask, temperature)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """β·KL(p_T ‖ M) + (1 − β)·KL(p_S ‖ M), M = β·p_T + (1 − β)·p_S (in log space); mean over positions."""
    return divergence("generalized_jsd", student_logits, teacher, mask, temperature, beta)


def total_variation(
    student_logits: torch.Tensor, teacher: TeacherSignal, mask: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """½·Σ|p_T − p_S|: mean over masked positions."""
    return divergence("total_variation", student_logits, teacher, mask, temperature)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hard-label cross-entropy in fp32, mean over the masked positions."""
    if not bool(mask.any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(_select(logits, mask).float(), targets[mask.to(targets.device)])


def distillation_loss(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    targets: torch.Tensor,
    cfg: DistillConfig,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
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

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_student_layers: int,
        n_teacher_layers: int,
        layer_map: list[int] | None = None,
        kind: str = "cosine",
    ) -> None:
        super().__init__()
        if kind not in ("cosine", "mse"):
            raise ConfigError(f"distill.hidden_loss: must be cosine or mse, got {kind!r}")
        if layer_map is None:
            layer_map = uniform_layer_map(n_student_layers, n_teacher_layers)
        if len(layer_map) != n_student_layers or not all(0 <= t < n_teacher_layers for t in layer_map):
            raise ConfigError(
                f"distill.layer_map: needs {n_student_layers} teacher block indices in "
                f"[0, {n_teacher_layers}), got {layer_map}"
            )
        self.kind, self.layer_map = kind, list(layer_map)
        self.proj = nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(
        self, student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
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


def attention_transfer(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
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

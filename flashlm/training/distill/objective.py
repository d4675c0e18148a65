"""The distillation objective: `DistillObjective` (the per-step loss, alone or around the run's own
objective), its batch makers, `distill_objective` (what `flashlm.training.train` uses for a run with a
``distill:`` section: it loads the teacher, building the logit cache first when asked), the factory the loop
takes for it (`distill_objective_for`) and `distill_student`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flashlm.config import DistillConfig, ModelConfig, TrainConfig
from flashlm.data.batches import IGNORE_INDEX
from flashlm.errors import CheckpointError, ConfigError, DataError
from flashlm.model.transformer import FlashLM, LMOutput
from flashlm.training.distill.cache import CACHE_META, LogitCache, _read_json
from flashlm.training.distill.caching import build_logit_cache
from flashlm.training.distill.losses import (
    HiddenStateLoss,
    TeacherSignal,
    TopK,
    _select,
    attention_transfer,
    distillation_loss,
    divergence,
)
from flashlm.training.distill.student_init import init_student_from_teacher
from flashlm.training.distill.teachers import CachedTeacher, OnlineTeacher, TeacherOutput, load_teacher, teacher_kind


def _extra(batch: Any, name: str, default: Any = None) -> Any:
    extras = getattr(batch, "extras", None) or {}
    return extras.get(name, getattr(batch, name, default))


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
    - **around an objective** (``base``, how `flashlm.training` uses it): the base objective's loss runs as usual
      (CLM, masked LM, NSP, prefix LM or their hybrid; its metrics are kept) and is the hard-label term:
      ``α·base + (1 − α)·T²·D`` on the positions the base trains, the teacher seeing the same input in the
      same attention mode. Batches the teacher cannot score (a cached or HF teacher and a non-causal batch;
      a cached teacher and a batch without stream offsets) train on the base loss alone, their distill_*
      metrics NaN. Metrics added: distill_kd (+ distill_hidden, distill_attn).

    The batch carries ``input_ids``, ``targets`` (IGNORE_INDEX where untrained), ``mode``, ``doc_ids``,
    ``prefix_len`` and, for a cached teacher, ``extras["starts"]``: the stream offset of each row's first
    input token (row b's inputs are ``tokens[s_b : s_b + T]``).
    """

    def __init__(
        self,
        cfg: DistillConfig,
        teacher: OnlineTeacher | CachedTeacher,
        student_cfg: ModelConfig,
        base: Any = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        cfg.validate()
        cached = isinstance(teacher, CachedTeacher)
        if cached and (cfg.hidden_weight > 0 or cfg.attention_weight > 0):
            raise ConfigError(
                "distill.hidden_weight/attention_weight: a cached teacher has no hidden states "
                "or attentions; set them to 0 or use an online teacher"
            )
        self.cfg, self.teacher, self.base, self.init_from = cfg, teacher, base, init_from
        # a base loss with trainable heads of its own (the NSP head) trains and checkpoints with this one
        self.base_loss = base.loss if base is not None and isinstance(base.loss, nn.Module) else None
        self.hidden = None
        if cfg.hidden_weight > 0:
            self.hidden = HiddenStateLoss(
                student_cfg.d_model,
                teacher.d_model,
                student_cfg.n_layers,
                teacher.n_layers,
                cfg.layer_map,
                cfg.hidden_loss,
            )

    @property
    def needs_hidden_states(self) -> bool:
        return self.cfg.hidden_weight > 0

    @property
    def needs_attentions(self) -> bool:
        return self.cfg.attention_weight > 0

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.base is not None:
            return self._around_base(model, batch)
        out = model(
            batch.input_ids,
            mode=batch.mode,
            doc_ids=batch.doc_ids,
            prefix_len=batch.prefix_len,
            return_hidden_states=self.needs_hidden_states,
            return_attentions="last" if self.needs_attentions else False,
        )
        return self.loss(out, batch)

    def as_objective(self, name: str = "distill") -> Any:
        """This loss with `distill_batch` as a `flashlm.training.objectives.Objective` for the loop."""
        from flashlm.training.objectives import Objective

        return Objective(name, distill_batch, self)

    def init_student(self, model: FlashLM) -> None:
        """With ``student_init: teacher``, overwrite `model`'s weights with every k-th teacher layer (the
        teacher read in fp32 from its checkpoint); a no-op otherwise. The loop calls it before wrapping."""
        if self.cfg.student_init != "teacher":
            return
        if not self.init_from:
            raise ConfigError("distill.student_init: teacher initialisation needs a FlashLM teacher checkpoint")
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
        out = self.teacher(
            batch.input_ids,
            mode=_extra(batch, "mode", "causal"),
            prefix_len=_extra(batch, "prefix_len"),
            doc_ids=_extra(batch, "doc_ids"),
            return_hidden_states=self.needs_hidden_states,
            return_attentions=self.needs_attentions,
        )
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

    def _extras(
        self, loss: torch.Tensor, student_out: LMOutput, t_out: TeacherOutput | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        from flashlm.training.objectives import clm_loss

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
        out = model(
            batch.input_ids,
            mode=batch.mode,
            doc_ids=batch.doc_ids,
            prefix_len=batch.prefix_len,
            return_hidden_states=self.needs_hidden_states,
            return_attentions="last" if self.needs_attentions else False,
        )
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

    def _divergence(self, model: nn.Module, out: LMOutput, signal: TeacherSignal, mask: torch.Tensor) -> torch.Tensor:
        """D on the trained positions; when the base ran the LM head on those positions only (masked LM),
        the head runs on them again here (the hidden states are shared, so only the head's cost repeats)."""
        cfg = self.cfg
        if out.logits is not None:
            use = None if bool(mask.all()) else mask
            return divergence(cfg.divergence, out.logits, signal, use, cfg.temperature, cfg.beta)
        from flashlm.training.objectives import unwrap

        logits = unwrap(model).logits(out.hidden[mask])
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
def distill_objective(
    cfg: Any,
    base: Any,
    data: Any,
    device: torch.device | str = "cpu",
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Any:
    """The objective `flashlm.training` uses for a run with a `distill:` section.

    `base` is the run's own objective (train.objective or the hybrid of train.objectives); the result keeps
    its batches and frozen parameters and adds the distillation terms (`DistillObjective` around `base`).
    The teacher is loaded on `device` and checked against the run's tokenizer (`data.tokenizer_file`: the
    shards' tokenizer.json or train.tokenizer); with ``distill.cache`` the top-k cache is used, built first
    from ``distill.teacher`` over train.data (rank 0 builds, the others wait at `barrier`) when missing.
    """
    from flashlm.training.objectives import Objective

    dcfg: DistillConfig = cfg.distill
    tok_file = data.tokenizer_file
    if tok_file is None:
        raise ConfigError(
            "distill: the student's tokenizer is unknown (no tokenizer.json in train.data and "
            "train.tokenizer unset); set train.tokenizer so the teacher's vocabulary can be "
            "checked"
        )
    source = dcfg.teacher
    if dcfg.cache:
        source = _ensure_cache(dcfg, cfg.train, device, is_main, barrier, tok_file)
    teacher = load_teacher(source, device, student_tokenizer=tok_file, need_attentions=dcfg.attention_weight > 0)
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


def distill_objective_for(cfg: Any, base: Any = None) -> Callable[[Any, Any], Any]:
    """The factory `flashlm.training.loop.train` takes for a run with a ``distill:`` section: once the loop has
    opened the data and joined the process group, ``factory(data, env)`` builds `distill_objective` around
    `base` (the run's own objective, ``train.objective``, when None)."""

    def build(data: Any, env: Any) -> Any:
        from flashlm.training.objectives import build_objective

        return distill_objective(cfg, base or build_objective(cfg.train), data, env.device, env.is_main, env.barrier)

    return build


def _ensure_cache(
    dcfg: DistillConfig,
    tcfg: TrainConfig,
    device: torch.device | str,
    is_main: bool,
    barrier: Callable[[], None],
    tok_file: Path,
) -> str:
    out = Path(dcfg.cache)
    meta = _read_json(out / CACHE_META) if (out / CACHE_META).is_file() else {}
    if not meta.get("complete"):
        if not dcfg.teacher:
            raise ConfigError(f"distill.cache: no finished cache at {out} and no distill.teacher to build it from")
        if is_main:
            teacher = load_teacher(dcfg.teacher, device, student_tokenizer=tok_file)
            if isinstance(teacher, CachedTeacher):
                raise ConfigError(
                    f"distill.teacher: {dcfg.teacher} is itself a logit cache; to build "
                    f"distill.cache={out}, point distill.teacher at a model"
                )
            build_logit_cache(
                teacher,
                tcfg.data,
                out,
                top_k=dcfg.top_k,
                seq_len=min(tcfg.seq_len, teacher.max_seq_len),
                batch_size=tcfg.batch_size,
                progress=True,
            )
            del teacher
        barrier()
    return str(out)


def _check_cache_fits(cache: LogitCache, stream: Any) -> None:
    if cache.n_positions != len(stream) or cache.meta.get("split", "train") != "train":
        raise DataError(
            f"distill.teacher: the cache {cache.path} covers {cache.n_positions:,} positions of "
            f"split {cache.meta.get('split')!r} but train.data's train split has {len(stream):,} "
            "tokens; build the cache from the same shards (`flashlm distill cache`)"
        )


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
        raise ConfigError(
            f"distill.student_init: teacher initialisation needs a FlashLM teacher checkpoint, "
            f"and {path or 'the cache'} is not one; use student_init: scratch"
        )
    return path


def distill_student(
    teacher: str | os.PathLike,
    shards: str | os.PathLike,
    student: ModelConfig | str,
    steps: int,
    out: str | os.PathLike,
    **settings: Any,
) -> dict[str, Any]:
    """Distil `teacher` (a FlashLM or HF model dir, or a logit cache) into a new `student` (a ModelConfig or a
    preset name) on the token shards `shards`; returns `flashlm.training`'s summary.

    `settings` are ``section__key=value`` overrides, e.g. ``distill__alpha=0.3, train__batch_size=8``
    (a bare key means a distill key: ``alpha=0.3``). Equivalent to `flashlm.training` on a RunConfig with a
    ``distill:`` section, which is what this builds.
    """
    from flashlm.config import RunConfig, apply_overrides, get_preset
    from flashlm.training.loop import train

    model = get_preset(student) if isinstance(student, str) else student
    data = {
        "model": model.to_dict(),
        "train": {"data": str(shards), "out": str(out), "steps": steps, "seq_len": min(256, model.max_seq_len)},
        "distill": {"teacher": str(teacher)},
    }
    overrides = []
    for key, value in settings.items():
        section, _, name = key.rpartition("__")
        overrides.append(f"{section or 'distill'}.{name}={json.dumps(value)}")
    cfg = RunConfig.from_dict(apply_overrides(data, overrides))
    return train(cfg, objective=distill_objective_for(cfg))

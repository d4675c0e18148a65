"""Teachers: a frozen model run without gradients (`OnlineTeacher`: a FlashLM or a local HF causal LM) or a
logit cache read back (`CachedTeacher`), and `load_teacher`, which tells them apart from a directory and
checks the teacher's vocabulary against the student's."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flashlm.errors import CheckpointError, FlashLMError, first_line
from flashlm.model.transformer import FlashLM
from flashlm.training.distill.cache import CACHE_FORMAT, CACHE_META, LogitCache, _read_json
from flashlm.training.distill.losses import TopK
from flashlm.training.distill.vocab import TOKENIZER_FILE, check_vocab, vocab_fingerprint, vocab_from_dir, vocab_of


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

    def __init__(
        self,
        model: nn.Module,
        kind: str = "flashlm",
        vocab: dict[str, int] | None = None,
        source: str = "<in-memory>",
        tokenizer_file: Path | None = None,
    ) -> None:
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
    def __call__(
        self,
        input_ids: torch.Tensor,
        mode: str = "causal",
        prefix_len: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        return_hidden_states: bool = False,
        return_attentions: bool = False,
    ) -> TeacherOutput:
        input_ids = input_ids.to(self.device)
        if self.kind == "flashlm":
            out = self.model(
                input_ids,
                mode=mode,
                prefix_len=prefix_len,
                doc_ids=None if doc_ids is None else doc_ids.to(self.device),
                return_hidden_states=return_hidden_states,
                return_attentions="last" if return_attentions else False,
            )
            logits, hidden, attns = out.logits, out.hidden_states, out.attentions
        else:
            if mode != "causal":
                raise FlashLMError(f"HF teacher {self.source} runs causal attention only; the batch asks for {mode!r}")
            out = self.model(
                input_ids=input_ids,
                output_hidden_states=return_hidden_states,
                output_attentions=return_attentions,
                use_cache=False,
            )
            logits = out.logits
            hidden = list(out.hidden_states) if return_hidden_states else None
            attns = list(out.attentions) if return_attentions and out.attentions is not None else None
            if return_attentions and not attns:
                raise FlashLMError(
                    f"HF teacher {self.source} returned no attentions; load it with need_attentions=True"
                )
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

    def __call__(self, starts: np.ndarray | torch.Tensor, length: int, device: torch.device | str = "cpu") -> TopK:
        """`TopK` [B, length, k] for the windows starting at `starts` (stream offsets), on `device`."""
        if isinstance(starts, torch.Tensor):
            starts = starts.cpu().numpy()
        ids, logprobs = self.cache.lookup(np.asarray(starts), length)
        ids_t = torch.from_numpy(ids).to(device, non_blocking=True).long()
        lp_t = torch.from_numpy(logprobs).to(device, non_blocking=True).float()
        return TopK(ids_t, lp_t, self.cache.vocab_size)


def teacher_kind(path: str | os.PathLike) -> str:
    """ "cache", "flashlm" or "hf" for a teacher directory; CheckpointError when it is none of those."""
    path = Path(path)
    if (path / CACHE_META).is_file() and _read_json(path / CACHE_META).get("format") == CACHE_FORMAT:
        return "cache"
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(
            f"{path}: not a teacher (no config.json and no logit cache); pass a FlashLM "
            "checkpoint, a local transformers model dir or a `flashlm distill cache` dir"
        )
    data = _read_json(config)
    if data.get("architecture") == "FlashLM":
        return "flashlm"
    if "model_type" in data:
        return "hf"
    raise CheckpointError(f"{config}: neither a FlashLM nor a transformers config (no model_type)")


def load_teacher(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    student_tokenizer: Any = None,
    need_attentions: bool = False,
) -> OnlineTeacher | CachedTeacher:
    """Load a teacher (FlashLM dir, local HF causal-LM dir, or a logit cache) and check its vocabulary.

    Online teachers go to `device` (default CUDA when available), in bf16 on CUDA, frozen, in eval mode.
    `student_tokenizer` (anything `vocab_of` reads): when given, the teacher's vocabulary must equal it.
    `need_attentions` loads HF teachers with eager attention so they can return attention maps.
    """
    kind = teacher_kind(path)
    if kind == "cache":
        teacher: OnlineTeacher | CachedTeacher = CachedTeacher(path)
    else:
        from flashlm.hardware import default_device

        device = default_device(str(device or "auto"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = (
            FlashLM.from_pretrained(path, device=device, dtype=dtype)
            if kind == "flashlm"
            else _load_hf_model(Path(path), device, dtype, need_attentions)
        )
        tok_file = Path(path) / TOKENIZER_FILE
        teacher = OnlineTeacher(model, kind, vocab_from_dir(path), str(path), tok_file if tok_file.is_file() else None)
    if student_tokenizer is not None:
        _check_student_vocab(teacher, vocab_of(student_tokenizer), str(path))
    return teacher


def _check_student_vocab(teacher: OnlineTeacher | CachedTeacher, student: dict[str, int], path: str) -> None:
    if teacher.vocab is not None:
        check_vocab(student, teacher.vocab, f"teacher {path}")
        return
    stored = teacher.cache.meta.get("tokenizer_fingerprint") if isinstance(teacher, CachedTeacher) else None
    if stored is None:
        raise FlashLMError(
            f"teacher {path} has no tokenizer to compare with the student's; put its tokenizer.json next to its weights"
        )
    if stored != vocab_fingerprint(student):
        raise FlashLMError(
            f"teacher {path} and the student use different tokenizers (the cache's vocabulary "
            "fingerprint differs); distill only between models that share a tokenizer"
        )


def _load_hf_model(path: Path, device: torch.device, dtype: torch.dtype, need_attentions: bool) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise FlashLMError(
            "HF teachers need `transformers`; install it with `pip install 'transformers>=4.50'`"
        ) from None
    v5 = int(transformers.__version__.split(".")[0]) >= 5
    kwargs: dict[str, Any] = {
        "local_files_only": True,
        "trust_remote_code": False,
        ("dtype" if v5 else "torch_dtype"): dtype,
    }
    if need_attentions:
        kwargs["attn_implementation"] = "eager"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = first_line(exc)
        raise CheckpointError(f"{path}: cannot load as a transformers causal LM ({first})") from None
    return model.to(device)

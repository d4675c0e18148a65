"""Extractive question answering in SQuAD v1.1 format with a span head.

The input is ``<bos> question <sep> context <eos>`` with bidirectional attention; `SpanQA` puts a
``Linear(d_model, 2)`` on the final hidden states for start and end logits. Contexts longer than the
window are cut into overlapping windows (``doc_stride`` tokens shared by neighbours); a training
window that does not hold the whole answer points both ends at ``<bos>`` (position 0), as BERT does.
Decoding takes, in every window, the best span with start <= end, at most ``max_answer_len`` tokens,
inside the context, and keeps the best-scoring (start + end logit) span over an item's windows. Token
positions map back to characters through the tokenizer's offsets, so answers are exact substrings of
the context. EM/F1 use the official v1.1 normalisation (`flashlm.evaluate.metrics`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashlm.errors import DataError
from flashlm.evaluate.metrics import squad_scores
from flashlm.model.transformer import FlashLM, save_safetensors
from flashlm.tasks.squad_config import DEFAULT_MODEL, SquadConfig
from flashlm.training.finetune import fit, new_model

SPAN_HEAD_FILE = "span_head.safetensors"


# ---- the model ----------------------------------------------------------------------------------
class SpanQA(nn.Module):
    """A FlashLM with a start/end span head over its final hidden states."""

    def __init__(self, model: FlashLM) -> None:
        super().__init__()
        self.model = model
        self.span_head = nn.Linear(model.cfg.d_model, 2)
        nn.init.normal_(self.span_head.weight, std=model.cfg.init_std)
        nn.init.zeros_(self.span_head.bias)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Span logits [B, T, 2] (start, end) under bidirectional attention."""
        out = self.model(input_ids, mode="bidirectional", doc_ids=doc_ids, compute_logits=False)
        return self.span_head(out.hidden).float()

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
        """The FlashLM checkpoint plus ``span_head.safetensors``."""
        path = self.model.save_pretrained(directory, tokenizer)
        state = {k: v.detach().contiguous().cpu() for k, v in self.span_head.state_dict().items()}
        save_safetensors(Path(path) / SPAN_HEAD_FILE, state)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str = "cpu") -> SpanQA:
        """Load a `save_pretrained` directory (a plain FlashLM directory gets a fresh head)."""
        from safetensors.torch import load_file

        qa = cls(FlashLM.from_pretrained(directory, device=device)).to(device)
        head = Path(directory) / SPAN_HEAD_FILE
        if head.is_file():
            qa.span_head.load_state_dict(load_file(str(head), device=str(device)))
        return qa.eval()


# ---- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SquadItem:
    """One question over one context, with its gold answers (texts and character starts)."""

    qid: str
    question: str
    context: str
    answers: tuple[str, ...]
    starts: tuple[int, ...]


def read_squad(path: str | os.PathLike) -> list[SquadItem]:
    """Questions of a SQuAD v1.1 JSON file (``data/paragraphs/qas/answers/answer_start``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read SQuAD JSON ({exc})") from None
    items: list[SquadItem] = []
    try:
        for article in data.get("data", []):
            for para in article.get("paragraphs", []):
                for qa in para.get("qas", []):
                    answers = qa.get("answers", [])
                    items.append(
                        SquadItem(
                            str(qa.get("id", len(items))),
                            qa["question"],
                            para["context"],
                            tuple(a["text"] for a in answers),
                            tuple(int(a["answer_start"]) for a in answers),
                        )
                    )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # JSON of another shape
        where = f"question {len(items)}"
        raise DataError(
            f"{path}: not SQuAD v1.1 JSON at {where} ({type(exc).__name__}: {exc}); expected "
            "data/paragraphs/qas with question, context and answers"
        ) from None
    if not items:
        raise DataError(f"{path}: no questions found (expected data/paragraphs/qas)")
    return items


def squad_from_babi(questions: Iterable[Any], title: str = "babi") -> dict[str, Any]:
    """A SQuAD v1.1 dict from bAbI questions whose answer is a word of a supporting fact."""
    paragraphs = []
    for n, q in enumerate(questions):
        context = " ".join(q.story)
        start = _answer_start(q, context)
        if start is not None:
            paragraphs.append(
                {
                    "context": context,
                    "qas": [
                        {
                            "id": f"{title}-{n}",
                            "question": q.question,
                            "answers": [{"text": context[start : start + len(q.answer)], "answer_start": start}],
                        }
                    ],
                }
            )
    return {"version": "1.1", "data": [{"title": title, "paragraphs": paragraphs}]}


def _answer_start(q: Any, context: str) -> int | None:
    """Character start of the answer inside its (last) supporting fact in ``context``."""
    for fact_index in sorted(q.supporting, reverse=True):
        fact_start = len(" ".join(q.story[:fact_index])) + (1 if fact_index else 0)
        word = q.story[fact_index].lower().rfind(q.answer.lower())
        if word >= 0:
            return fact_start + word
    return None


# ---- windows ------------------------------------------------------------------------------------
@dataclass
class Window:
    """One model input cut from an item: ids, where the context starts, and char offsets."""

    item: int
    ids: list[int]
    context_start: int  # position in `ids` of the first context token
    offsets: list[tuple[int, int]]  # character span in the context of each context token
    start: int = 0  # gold answer positions in `ids` (0: not inside this window)
    end: int = 0


def make_windows(
    tokenizer: Any, items: Sequence[SquadItem], max_len: int, doc_stride: int = 64, max_question: int = 64
) -> list[Window]:
    """Every item's windows; neighbours share ``doc_stride`` context tokens."""
    windows = []
    for index, item in enumerate(items):
        question = tokenizer.encode(item.question)[:max_question]
        head = [tokenizer.bos_id, *question, tokenizer.sep_id]
        enc = tokenizer.backend.encode(item.context, add_special_tokens=False)
        room = max_len - len(head) - 1
        if room < 8:
            raise DataError(f"max_len {max_len} leaves no room for the context; raise it or cut questions")
        gold = answer_tokens(item, enc.offsets)
        for first in range(0, len(enc.ids), max(room - doc_stride, 1)):
            win = Window(
                index,
                [*head, *enc.ids[first : first + room], tokenizer.eos_id],
                len(head),
                list(enc.offsets[first : first + room]),
            )
            if gold is not None and first <= gold[0] and gold[1] < first + room:
                win.start, win.end = len(head) + gold[0] - first, len(head) + gold[1] - first
            windows.append(win)
            if first + room >= len(enc.ids):
                break
    return windows


def answer_tokens(item: SquadItem, offsets: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """First and last context token overlapping the first gold answer's characters (None: no answer)."""
    if not item.answers:
        return None
    a, b = item.starts[0], item.starts[0] + len(item.answers[0])
    hits = [i for i, (s, e) in enumerate(offsets) if e > a and s < b]
    return (hits[0], hits[-1]) if hits else None


def collate_windows(windows: Sequence[Window], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding in its own document; the context mask and gold positions."""
    width = max(len(w.ids) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    doc_ids = torch.ones_like(ids)
    context = torch.zeros_like(ids, dtype=torch.bool)
    for row, w in enumerate(windows):
        ids[row, : len(w.ids)] = torch.tensor(w.ids)
        doc_ids[row, : len(w.ids)] = 0
        context[row, w.context_start : w.context_start + len(w.offsets)] = True
    gold = torch.tensor([[w.start, w.end] for w in windows], dtype=torch.long)
    return {"input_ids": ids, "doc_ids": doc_ids, "context": context, "start": gold[:, 0], "end": gold[:, 1]}


def span_loss(qa: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the start and end cross-entropies over the real (non-padding) positions."""
    logits = qa(batch["input_ids"], batch["doc_ids"])
    logits = logits.masked_fill((batch["doc_ids"] != 0)[..., None], float("-inf"))
    return (F.cross_entropy(logits[..., 0], batch["start"]) + F.cross_entropy(logits[..., 1], batch["end"])) / 2


# ---- decoding -----------------------------------------------------------------------------------
def best_span(
    start_logits: torch.Tensor, end_logits: torch.Tensor, valid: torch.Tensor, max_answer_len: int
) -> tuple[int, int, float]:
    """The (start, end, score) maximising start + end logit with start <= end < start + max_answer_len,
    both inside ``valid`` (a bool mask over positions). Exact: scores every allowed pair."""
    if not bool(valid.any()):
        raise ValueError("no valid position to answer from")
    T = start_logits.shape[0]
    scores = start_logits.float()[:, None] + end_logits.float()[None, :]
    i = torch.arange(T)
    allowed = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < max_answer_len)
    allowed &= valid[:, None] & valid[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    flat = int(scores.argmax())
    return flat // T, flat % T, float(scores.view(-1)[flat])


def merge_windows(candidates: Iterable[tuple[int, str, float]]) -> dict[int, str]:
    """The best-scoring answer text of every item from (item, text, score) window candidates."""
    best: dict[int, tuple[float, str]] = {}
    for item, text, score in candidates:
        if item not in best or score > best[item][0]:
            best[item] = (score, text)
    return {item: text for item, (_, text) in best.items()}


@torch.no_grad()
def predict(
    qa: SpanQA,
    items: Sequence[SquadItem],
    windows: Sequence[Window],
    max_answer_len: int = 30,
    batch_size: int = 32,
) -> list[str]:
    """The answer text of every item (best valid span over its windows)."""
    qa.eval()
    device = next(qa.parameters()).device
    candidates = []
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        batch = collate_windows(chunk)
        logits = qa(batch["input_ids"].to(device), batch["doc_ids"].to(device)).cpu()
        for row, w in enumerate(chunk):
            s, e, score = best_span(logits[row, :, 0], logits[row, :, 1], batch["context"][row], max_answer_len)
            a, b = w.offsets[s - w.context_start][0], w.offsets[e - w.context_start][1]
            candidates.append((w.item, items[w.item].context[a:b].strip(), score))
    texts = merge_windows(candidates)
    return [texts.get(i, "") for i in range(len(items))]


# ---- the task -----------------------------------------------------------------------------------
def run_squad(
    train_file: str | os.PathLike,
    eval_file: str | os.PathLike,
    cfg: SquadConfig,
    model: FlashLM | None = None,
    tokenizer: Any = None,
    save_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fine-tune a span head (on ``model`` or a new model) and score EM/F1 on ``eval_file``
    (``save_dir`` keeps the fine-tuned model, its span head and the tokenizer)."""
    began = time.perf_counter()
    train = read_squad(train_file)[: cfg.train_limit]
    test = read_squad(eval_file)[: cfg.eval_limit]
    if model is None:
        texts = (t for item in train for t in (item.question, item.context))
        model, tokenizer = new_model(texts, cfg.model, cfg.vocab_size, cfg.finetune.seed, cfg.device)
    max_len = min(cfg.max_len, model.cfg.max_seq_len)
    qa = SpanQA(model).to(next(model.parameters()).device)
    windows = make_windows(tokenizer, train, max_len, cfg.doc_stride, cfg.max_question)
    summary = fit(qa, windows, collate_windows, span_loss, cfg.finetune, [len(w.ids) for w in windows])
    if save_dir is not None:
        qa.save_pretrained(save_dir, tokenizer)
    test_windows = make_windows(tokenizer, test, max_len, cfg.doc_stride, cfg.max_question)
    predictions = predict(qa, test, test_windows, cfg.max_answer_len, cfg.eval_batch_size)
    scores = squad_scores(predictions, [list(item.answers) or [""] for item in test])
    return {
        **scores,
        "train_questions": len(train),
        "train_windows": len(windows),
        "eval_windows": len(test_windows),
        "train": {k: v for k, v in summary.items() if k != "history"},
        "total_seconds": time.perf_counter() - began,
        "parameters": qa.model.num_parameters(),
        "examples": [
            {"question": t.question, "prediction": p, "answers": list(t.answers)}
            for t, p in zip(test[:5], predictions[:5], strict=False)
        ],
    }


__all__ = [
    "DEFAULT_MODEL",
    "SpanQA",
    "SquadConfig",
    "SquadItem",
    "Window",
    "answer_tokens",
    "best_span",
    "collate_windows",
    "make_windows",
    "merge_windows",
    "predict",
    "read_squad",
    "run_squad",
    "span_loss",
    "squad_from_babi",
]

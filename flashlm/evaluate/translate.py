"""Translation with a prefix LM: ``<bos> source <sep> target <eos>``, scored by BLEU and chrF.

One byte-level BPE tokenizer is trained on both languages' training text (or the model's own is
used). Fine-tuning reuses `flashlm.train.finetune`; decoding is greedy (`generate_tokens`) or a
batched beam search over the KV cache: every source keeps ``beam`` rows, and after each step the
cache rows are reordered to follow the surviving hypotheses. Finished hypotheses are ranked by
``sum log p / length ** length_penalty`` (0: plain sum). Outputs are decoded back to plain text, so
sacrebleu sees detokenised hypotheses and the raw references.
"""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flashlm.config import ModelConfig
from flashlm.errors import DataError
from flashlm.evaluate.metrics import bleu, chrf
from flashlm.model.cache import KVCache
from flashlm.model.transformer import FlashLM
from flashlm.train.finetune import (
    FinetuneConfig,
    finetune,
    greedy_decode,
    length_batches,
    make_example,
    new_model,
    prompt_ids,
)

# reorder(rows) re-indexes the decoder state; step(tokens) → log-probabilities [rows, V]
StepFn = Callable[[torch.Tensor], torch.Tensor]
ReorderFn = Callable[[torch.Tensor], None]
# allowed(source, tokens so far) → the token ids that may come next, or None for any
AllowedFn = Callable[[int, list[int]], Sequence[int] | None]

DEFAULT_MODEL = ModelConfig(
    vocab_size=8192,
    d_model=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    d_ff=768,
    layer_pattern="G",
    max_seq_len=160,
)


@dataclass
class TranslateConfig:
    """Model, training and decoding settings of `run_translation`."""

    vocab_size: int = 8000
    model: ModelConfig | str = field(default_factory=lambda: DEFAULT_MODEL)
    finetune: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(
            epochs=10, batch_size=64, lr=2e-3, warmup_steps=200, bucket=32, label_smoothing=0.1
        )
    )
    beam: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int = 80
    eval_batch_size: int = 64
    train_limit: int | None = None
    eval_limit: int | None = None
    device: str = "cpu"  # where a fresh model is built


# ---- data ---------------------------------------------------------------------------------------
def read_lines(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Lines of a text file (gzip when the name ends in .gz), without their newlines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit is not None else lines


def read_pairs(src: str | os.PathLike, tgt: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """Line-aligned (source, target) pairs; the files must have as many lines."""
    sources, targets = read_lines(src, limit), read_lines(tgt, limit)
    if len(sources) != len(targets):
        raise DataError(f"{src} has {len(sources)} lines but {tgt} has {len(targets)}; they must align")
    return list(zip(sources, targets, strict=True))


# ---- beam search --------------------------------------------------------------------------------
@dataclass
class _Hyps:
    """Finished hypotheses of one source: (normalised score, raw log-prob, tokens)."""

    done: list[tuple[float, float, list[int]]] = field(default_factory=list)

    def add(self, tokens: list[int], logp: float, length_penalty: float) -> None:
        self.done.append((logp / max(len(tokens), 1) ** length_penalty, logp, tokens))

    def best(self) -> tuple[list[int], float]:
        score, logp, tokens = max(self.done, key=lambda d: d[0])
        return tokens, logp


def beam_search_core(
    first: torch.Tensor,
    step: StepFn,
    reorder: ReorderFn,
    beam: int,
    max_new_tokens: int,
    eos_id: int,
    length_penalty: float = 1.0,
    allowed: AllowedFn | None = None,
) -> list[tuple[list[int], float]]:
    """Beam search from the first-step log-probabilities ``first`` [N, V] of N sources.

    The decoder state holds N·beam rows (source i in rows i·beam … i·beam + beam − 1); ``reorder``
    re-indexes it, ``step`` feeds one token per row and returns log-probabilities [N·beam, V].
    With ``allowed``, each row may only continue with the tokens it names (constrained decoding).
    Returns, per source, the best finished hypothesis (tokens without ``<eos>``) and its log-prob.
    """
    n, vocab = first.shape
    scores = torch.full((n, beam), float("-inf"))
    scores[:, 0] = 0.0  # all rows start equal: keep one, or the beam fills with copies
    logp = first.float().repeat_interleave(beam, 0)
    tokens: list[list[int]] = [[] for _ in range(n * beam)]
    hyps = [_Hyps() for _ in range(n)]
    active = [True] * n
    for t in range(max_new_tokens):
        if allowed is not None:
            logp = _constrain(logp, tokens, beam, allowed)
        cand = (scores[:, :, None] + logp.view(n, beam, vocab)).view(n, -1)
        top_scores, top_idx = cand.topk(2 * beam, dim=1)
        rows, next_tokens, new_scores = _select(
            top_scores,
            top_idx,
            vocab,
            beam,
            tokens,
            hyps,
            active,
            eos_id,
            length_penalty,
            last=t == max_new_tokens - 1,
        )
        if not any(active):
            break
        tokens = [tokens[r] + [tok] for r, tok in zip(rows.tolist(), next_tokens.tolist(), strict=True)]
        scores = new_scores
        reorder(rows)
        logp = step(next_tokens).float()
    for i in range(n):
        if not hyps[i].done:  # nothing finished: keep the best live hypothesis
            hyps[i].add(tokens[i * beam], float(scores[i, 0]), length_penalty)
    return [h.best() for h in hyps]


def _constrain(logp: torch.Tensor, tokens: list[list[int]], beam: int, allowed: AllowedFn) -> torch.Tensor:
    """``logp`` with -inf wherever ``allowed`` forbids a row's next token."""
    out = logp.clone()
    for row, history in enumerate(tokens):
        ids = allowed(row // beam, history)
        if ids is not None:
            keep = out[row, list(ids)]
            out[row] = float("-inf")
            out[row, list(ids)] = keep
    return out


def _select(
    top_scores: torch.Tensor,
    top_idx: torch.Tensor,
    vocab: int,
    beam: int,
    tokens: list[list[int]],
    hyps: list[_Hyps],
    active: list[bool],
    eos_id: int,
    length_penalty: float,
    last: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move candidates ending in <eos> to the finished lists; keep the best `beam` others alive.

    A source is done once it has `beam` finished hypotheses, or, with ``length_penalty`` 0 (a plain
    sum of log-probabilities, which only falls), once none alive scores above its best finished one:
    then short hypotheses that finish early cannot crowd out a longer, likelier one."""
    n = top_scores.shape[0]
    rows = torch.zeros(n * beam, dtype=torch.long)
    next_tokens = torch.full((n * beam,), eos_id, dtype=torch.long)
    new_scores = torch.full((n, beam), float("-inf"))
    for i in range(n):
        rows[i * beam : (i + 1) * beam] = i * beam
        if not active[i]:
            continue
        kept = 0
        for rank, (score, idx) in enumerate(zip(top_scores[i].tolist(), top_idx[i].tolist(), strict=True)):
            row, tok = i * beam + idx // vocab, idx % vocab
            if score == float("-inf"):
                break
            if tok == eos_id:
                if rank < beam:  # an <eos> outside the top `beam` would cut a better live path short
                    hyps[i].add(list(tokens[row]), score, length_penalty)
            elif kept < beam:
                rows[i * beam + kept], next_tokens[i * beam + kept] = row, tok
                new_scores[i, kept] = score
                kept += 1
            if len(hyps[i].done) >= beam and length_penalty != 0.0:
                break
        if length_penalty == 0.0:  # scores only fall: stop once no live path can beat the best finished
            best_done = max((d[0] for d in hyps[i].done), default=float("-inf"))
            finished = kept == 0 or float(new_scores[i, 0]) <= best_done
        else:
            finished = len(hyps[i].done) >= beam
        if finished or last:
            active[i] = False
            if last:
                for k in range(kept):
                    hyps[i].add(
                        tokens[rows[i * beam + k]] + [int(next_tokens[i * beam + k])],
                        float(new_scores[i, k]),
                        length_penalty,
                    )
    return rows, next_tokens, new_scores


@torch.no_grad()
def beam_search(
    model: FlashLM,
    prompts: Sequence[Sequence[int]],
    beam: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    length_penalty: float = 1.0,
    allowed: AllowedFn | None = None,
) -> list[list[int]]:
    """Beam-search continuations of prefix-LM prompts (batched, left-padded, KV cache); ``allowed``
    constrains them (see `beam_search_core`, its source index is the prompt's)."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(beam)
    width = int(lengths.max())
    budget = min(max_new_tokens, model.cfg.max_seq_len - width)
    if budget <= 0:
        return [[] for _ in prompts]
    batch = torch.full((len(lengths), width), pad_id, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        batch[row * beam : (row + 1) * beam, width - len(p) :] = torch.tensor(list(p), device=device)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, len(lengths), width + budget, device, dtype, pad_left=width - lengths)
    logits = model(batch, mode="prefix", prefix_len=lengths, cache=cache).logits[:, -1]
    first = logits.float().log_softmax(-1)[::beam].cpu()

    def reorder(rows: torch.Tensor) -> None:
        _reorder_cache(cache, rows.to(device))

    def step(tokens: torch.Tensor) -> torch.Tensor:
        out = model(tokens[:, None].to(device), mode="prefix", prefix_len=lengths, cache=cache).logits[:, -1]
        return out.float().log_softmax(-1).cpu()

    results = beam_search_core(first, step, reorder, beam, budget, eos_id, length_penalty, allowed)
    return [tokens for tokens, _ in results]


def _reorder_cache(cache: KVCache, rows: torch.Tensor) -> None:
    cache.keys = [k.index_select(0, rows) for k in cache.keys]
    cache.values = [v.index_select(0, rows) for v in cache.values]
    if cache.pad_left is not None:
        cache.pad_left = cache.pad_left.index_select(0, rows)


def sequence_logprob(model: FlashLM, prompt: Sequence[int], continuation: Sequence[int]) -> float:
    """Sum of log p(continuation | prompt) under prefix-LM attention over the prompt."""
    ids = torch.tensor([[*prompt, *continuation]], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids[:, :-1], mode="prefix", prefix_len=torch.tensor([len(prompt)])).logits[0].float()
    logp = logits.log_softmax(-1)[len(prompt) - 1 :]
    return float(logp.gather(1, ids[0, len(prompt) :, None]).sum())


# ---- translation --------------------------------------------------------------------------------
def translate(
    model: FlashLM,
    tokenizer: Any,
    sources: Sequence[str],
    beam: int = 1,
    max_new_tokens: int = 80,
    batch_size: int = 64,
    length_penalty: float = 1.0,
) -> list[str]:
    """Translations of ``sources`` (greedy when ``beam`` is 1), batched shortest first."""
    model.eval()
    prompts = [prompt_ids(tokenizer, s, max(model.cfg.max_seq_len - max_new_tokens - 2, 1)) for s in sources]
    eos, pad = tokenizer.eos_id, tokenizer.pad_id or 0
    if beam == 1:
        outputs = greedy_decode(model, prompts, max_new_tokens, eos, pad, batch_size)
    else:
        outputs = [[] for _ in prompts]
        for rows in length_batches(prompts, max(batch_size // beam, 1)):
            found = beam_search(model, [prompts[i] for i in rows], beam, max_new_tokens, eos, pad, length_penalty)
            for i, out in zip(rows, found, strict=True):
                outputs[i] = out
    return [tokenizer.decode(out).strip() for out in outputs]


def run_translation(
    train_src: str | os.PathLike,
    train_tgt: str | os.PathLike,
    eval_src: str | os.PathLike,
    eval_tgt: str | os.PathLike,
    cfg: TranslateConfig,
    model: FlashLM | None = None,
    tokenizer: Any = None,
    save_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fine-tune on the training pairs, translate the evaluation sources, score BLEU and chrF
    (``save_dir`` keeps the fine-tuned model and tokenizer)."""
    began = time.perf_counter()
    train = read_pairs(train_src, train_tgt, cfg.train_limit)
    test = read_pairs(eval_src, eval_tgt, cfg.eval_limit)
    if model is None:
        texts = (text for pair in train for text in pair)
        model, tokenizer = new_model(texts, cfg.model, cfg.vocab_size, cfg.finetune.seed, cfg.device)
    max_len = model.cfg.max_seq_len
    examples = [make_example(tokenizer, s, t, max_len) for s, t in train]
    summary = finetune(model, examples, cfg.finetune)
    if save_dir is not None:
        model.save_pretrained(save_dir, tokenizer)
    decode_start = time.perf_counter()
    hyps = translate(
        model,
        tokenizer,
        [s for s, _ in test],
        cfg.beam,
        cfg.max_new_tokens,
        cfg.eval_batch_size,
        cfg.length_penalty,
    )
    refs = [t for _, t in test]
    return {
        "bleu": bleu(hyps, refs),
        "chrf": chrf(hyps, refs),
        "beam": cfg.beam,
        "train_pairs": len(train),
        "eval_pairs": len(test),
        "train_seconds": summary["seconds"],
        "decode_seconds": time.perf_counter() - decode_start,
        "total_seconds": time.perf_counter() - began,
        "parameters": model.num_parameters(),
        "model_config": model.cfg.to_dict(),
        "train": {k: v for k, v in summary.items() if k != "history"},
        "loss_history": summary["history"],
        "samples": [
            {"source": s, "reference": r, "hypothesis": h} for (s, r), h in zip(test[:5], hyps[:5], strict=False)
        ],
    }


def markdown(results: dict[str, Any]) -> str:
    """The report section: BLEU, chrF and time."""
    from flashlm.evaluate.report import table

    keys = ("bleu", "chrf", "beam", "train_pairs", "eval_pairs", "train_seconds", "total_seconds")
    return table(keys, [[results.get(k) for k in keys]])


def _register() -> None:
    from flashlm.evaluate.report import SECTIONS

    SECTIONS.setdefault("translate", markdown)


_register()

__all__ = [
    "TranslateConfig",
    "beam_search",
    "beam_search_core",
    "read_lines",
    "read_pairs",
    "run_translation",
    "sequence_logprob",
    "translate",
]

"""Sampling and streaming generation with the KV cache.

Prompts of different lengths are left-padded into one batch; the cache masks the padding and shifts
RoPE positions per row, so a batched row decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from flashlm.model.cache import KVCache
from flashlm.model.transformer import FlashLM


@dataclass
class Sampling:
    """How to pick each next token. temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    stop_at_eos: bool = True
    prefix_lm: bool = False  # attend bidirectionally over the prompt (prefix-LM fine-tuned models)


def next_token_scores(logits: torch.Tensor, history: torch.Tensor | None, s: Sampling) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to logits [B, V] (fp32)."""
    logits = logits.float()
    if s.repetition_penalty != 1.0 and history is not None:
        seen = torch.gather(logits, 1, history)
        seen = torch.where(seen > 0, seen / s.repetition_penalty, seen * s.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if s.temperature <= 0:
        return logits
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter(1, order, sorted_logits)
    return logits


def pick(scores: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    if s.temperature <= 0:
        return scores.argmax(-1)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: FlashLM, prompts: Sequence[Sequence[int]], sampling: Sampling,
                    eos_id: int | None = None, pad_id: int = 0) -> Iterator[list[int | None]]:
    """Yield, each step, the new token of every row (None for rows already finished)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start from <bos>)")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    budget = min(sampling.max_new_tokens, model.cfg.max_seq_len - width)
    if budget <= 0:
        return
    pad = width - lengths
    batch = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):] = torch.tensor(list(p), device=device)
    cache = KVCache(model.cfg, len(prompts), width + budget, device, dtype, pad_left=pad)
    mode = "prefix" if sampling.prefix_lm else "causal"
    prefix_len = lengths if sampling.prefix_lm else None
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    history = batch
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits = model(batch, mode=mode, prefix_len=prefix_len, cache=cache).logits[:, -1]
    for _ in range(budget):
        token = pick(next_token_scores(logits, history, sampling), sampling, generator)
        yield [None if d else int(t) for t, d in zip(token.tolist(), done.tolist(), strict=True)]
        if eos_id is not None and sampling.stop_at_eos:
            done |= token == eos_id
        if bool(done.all()):
            return
        history = torch.cat([history, token[:, None]], dim=1)
        logits = model(token[:, None], mode=mode, prefix_len=prefix_len, cache=cache).logits[:, -1]


class StopStrings:
    """Stop strings over streamed text: `feed` the whole decoded continuation after each token and get
    back the new piece that is safe to show. Text that could be the beginning of a stop string is held
    back until later tokens show it is not, so the pieces join to exactly the text cut at the first
    stop string; `stopped` turns true when one appears."""

    def __init__(self, stops: Sequence[str], emitted: int = 0) -> None:
        self.stops = [s for s in stops if s]
        self.emitted = emitted  # characters of the text already given out
        self.stopped = False

    def feed(self, text: str) -> str:
        cut = _stop_index(text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._take(text, cut)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its other bytes
            return ""
        return self._take(text, len(text) - _partial_stop(text, self.stops))

    def flush(self, text: str) -> str:
        """What is still held back of `text` once generation has ended."""
        return "" if self.stopped else self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        piece = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def stream(model: FlashLM, tokenizer, prompt: str, sampling: Sampling, add_bos: bool = True) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece, honouring stop strings
    (`StopStrings`), so the pieces always join to exactly what `generate` returns."""
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    produced: list[int] = []
    held, text = StopStrings(sampling.stop), ""
    for step in generate_tokens(model, [ids], sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0):
        token = step[0]
        if token is None or (token == tokenizer.eos_id and sampling.stop_at_eos):
            break
        produced.append(token)
        text = tokenizer.decode(produced)
        if piece := held.feed(text):
            yield piece
        if held.stopped:
            return
    if piece := held.flush(text):
        yield piece


def generate(model: FlashLM, tokenizer, prompts: str | Sequence[str], sampling: Sampling | None = None,
             add_bos: bool = True) -> str | list[str]:
    """Complete one prompt (returns a string) or a batch of prompts (returns a list)."""
    sampling = sampling or Sampling()
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    encoded = [tokenizer.encode(t, add_bos=add_bos) for t in texts]
    outputs: list[list[int]] = [[] for _ in texts]
    for step in generate_tokens(model, encoded, sampling, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id or 0):
        for row, token in enumerate(step):
            if token is not None and not (sampling.stop_at_eos and token == tokenizer.eos_id):
                outputs[row].append(token)
    results = []
    for ids in outputs:
        text = tokenizer.decode(ids)
        cut = _stop_index(text, sampling.stop)
        results.append(text if cut is None else text[:cut])
    return results[0] if single else results


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _stop_index(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None

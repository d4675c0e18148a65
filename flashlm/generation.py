"""Generation with the KV cache: sampling and streaming, greedy prefix-LM decoding, beam search.

Prompts of different lengths are left-padded into one batch; the cache masks the padding and shifts
RoPE positions per row, so a batched row decodes exactly as it would alone.

After the prompt's single forward pass, each new token goes through a decode step. ``decoder`` picks it:
"fast" (the default) runs `flashlm.model.decoding.DecodeStep`, which prepares masks, RoPE tables and
fused projections once instead of rebuilding them every step; "compiled" runs the same step under
`torch.compile` over a cache of the model's whole context (the first generation pays the compile);
"reference" runs `FlashLM.forward` itself. All three compute the same logits up to rounding.

`greedy_decode` continues ``<bos> source <sep>`` prompts of prefix-LM fine-tuned models greedily, in
batches of similar length (`length_batches`). `beam_search` is a batched beam search over the KV cache:
every source keeps ``beam`` rows, and after each step the cache rows are reordered to follow the
surviving hypotheses. Finished hypotheses are ranked by ``sum log p / length ** length_penalty`` (0:
plain sum); with ``allowed`` each row may only continue with the tokens it names (constrained
decoding). `sequence_logprob` scores a given continuation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from flashlm.model.cache import KVCache
from flashlm.model.decoding import DecodeStep
from flashlm.model.transformer import FlashLM

DECODERS = ("fast", "compiled", "reference")
# Ranges that keep the sampling math finite: logits / temperature and logits / penalty stay far from
# fp32 overflow (|logits| of a trained model are at most a few hundred), so softmax never sees inf or NaN.
TEMPERATURE_RANGE = (0.01, 2.0)  # or exactly 0: greedy
REPETITION_PENALTY_RANGE = (0.01, 10.0)


@dataclass
class Sampling:
    """How to pick each next token. temperature 0 means greedy.

    Out-of-range values raise ValueError naming the field: temperature 0 or in `TEMPERATURE_RANGE`,
    repetition_penalty in `REPETITION_PENALTY_RANGE`, top_k >= 1 (values above the vocabulary keep every
    token), top_p in (0, 1], max_new_tokens >= 0."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    stop_at_eos: bool = True
    prefix_lm: bool = False  # attend bidirectionally over the prompt (prefix-LM fine-tuned models)

    def __post_init__(self) -> None:
        low, high = TEMPERATURE_RANGE
        if not (self.temperature == 0 or low <= self.temperature <= high):
            raise ValueError(f"temperature must be 0 (greedy) or in [{low}, {high}], got {self.temperature}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be in [{low}, {high}], got {self.repetition_penalty}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {self.max_new_tokens}")


def next_token_scores(logits: torch.Tensor, history: torch.Tensor | None, s: Sampling) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to logits [B, V] (fp32). The penalty and
    temperature are clamped into their ranges here too, so a `Sampling` altered after its checks cannot
    push the scores to inf."""
    logits = logits.float()
    if s.repetition_penalty != 1.0 and history is not None:
        penalty = min(max(s.repetition_penalty, REPETITION_PENALTY_RANGE[0]), REPETITION_PENALTY_RANGE[1])
        seen = torch.gather(logits, 1, history)
        seen = torch.where(seen > 0, seen / penalty, seen * penalty)
        logits = logits.scatter(1, history, seen)
    if not s.temperature > 0:  # 0 (greedy), or NaN
        return logits
    logits = logits / min(max(s.temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])
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
    """The next token of each row: the best score when greedy, else a draw from `safe_probs(scores)`."""
    if not s.temperature > 0:
        return torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")).argmax(-1)
    return torch.multinomial(safe_probs(scores), 1, generator=generator).squeeze(-1)


def safe_probs(scores: torch.Tensor) -> torch.Tensor:
    """softmax(scores) [B, V] that `torch.multinomial` always accepts: NaN scores count as -inf, a row
    with +inf scores puts its mass evenly on them, and a row with no finite score (all -inf or NaN) puts
    it all on its first token instead of dividing by zero."""
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    infinite = torch.isposinf(scores)
    scores = torch.where(infinite.any(-1, keepdim=True), torch.where(infinite, 0.0, float("-inf")), scores)
    probs = scores.softmax(-1)
    empty = ~torch.isfinite(probs).all(-1, keepdim=True)
    fallback = torch.zeros_like(probs)
    fallback[:, 0] = 1.0
    return torch.where(empty, fallback, probs)


@torch.no_grad()
def generate_tokens(
    model: FlashLM,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    eos_id: int | None = None,
    pad_id: int = 0,
    decoder: str = "fast",
) -> Iterator[list[int | None]]:
    """Yield, each step, the new token of every row (None for rows already finished). ``decoder``:
    "fast", "compiled" or "reference" (see the module docstring)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start from <bos>)")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
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
        batch[row, width - len(p) :] = torch.tensor(list(p), device=device)
    # the compiled step keeps one cache length (the whole context), so later prompts reuse its graph
    max_len = model.cfg.max_seq_len if decoder == "compiled" else width + budget
    cache = KVCache(model.cfg, len(prompts), max_len, device, dtype, pad_left=pad)
    mode = "prefix" if sampling.prefix_lm else "causal"
    prefix_len = lengths if sampling.prefix_lm else None
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    history = batch
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits = model(batch, mode=mode, prefix_len=prefix_len, cache=cache).logits[:, -1]
    step = None if decoder == "reference" else DecodeStep(model, cache, compile=decoder == "compiled")
    for _ in range(budget):
        token = pick(next_token_scores(logits, history, sampling), sampling, generator)
        yield [None if d else int(t) for t, d in zip(token.tolist(), done.tolist(), strict=True)]
        if eos_id is not None and sampling.stop_at_eos:
            done |= token == eos_id
            if bool(done.all()):
                return
        if sampling.repetition_penalty != 1.0:  # the only reader of the history
            history = torch.cat([history, token[:, None]], dim=1)
        if step is not None:  # after the prompt, prefix-LM and causal decode steps see the same keys
            logits = step(token)
        else:
            logits = model(token[:, None], mode=mode, prefix_len=prefix_len, cache=cache).logits[:, -1]


# ---- prefix-LM decoding -----------------------------------------------------------------------
def length_batches(prompts: Sequence[Sequence[int]], size: int) -> Iterator[list[int]]:
    """Indices of ``prompts`` in batches of ``size``, shortest first (little padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for first in range(0, len(order), size):
        yield order[first : first + size]


@torch.no_grad()
def greedy_decode(
    model: FlashLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy prefix-LM continuations of ``<bos> source <sep>`` prompts, without the final <eos>."""
    model.eval()
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, prefix_lm=True)
    outputs: list[list[int]] = [[] for _ in prompts]
    for rows in length_batches(prompts, batch_size):
        for step in generate_tokens(model, [prompts[i] for i in rows], sampling, eos_id=eos_id, pad_id=pad_id):
            for i, token in zip(rows, step, strict=True):
                if token is not None and token != eos_id:
                    outputs[i].append(token)
    return outputs


# reorder(rows) re-indexes the decoder state; step(tokens) → log-probabilities [rows, V]
StepFn = Callable[[torch.Tensor], torch.Tensor]
ReorderFn = Callable[[torch.Tensor], None]
# allowed(source, tokens so far) → the token ids that may come next, or None for any
AllowedFn = Callable[[int, list[int]], Sequence[int] | None]


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

    decode = DecodeStep(model, cache)  # reads the cache rows `reorder` leaves at every step

    def step(tokens: torch.Tensor) -> torch.Tensor:
        return decode(tokens.to(device)).float().log_softmax(-1).cpu()

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
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def decode_after(tokenizer, context: Sequence[int], ids: Sequence[int]) -> str:
    """Text of the continuation ``ids`` as it reads after ``context`` (`Tokenizer.decode_continuation`):
    decoded alone, a SentencePiece continuation loses its leading space. Tokenizers without that method
    (any object with ``decode``) decode the continuation alone."""
    decode_continuation = getattr(tokenizer, "decode_continuation", None)
    return tokenizer.decode(ids) if decode_continuation is None else decode_continuation(context, ids)


def stream(
    model: FlashLM, tokenizer, prompt: str, sampling: Sampling, add_bos: bool = True, decoder: str = "fast"
) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece, honouring stop strings
    (`StopStrings`), so the pieces always join to exactly what `generate` returns."""
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    pad_id = tokenizer.pad_id or 0
    steps = generate_tokens(model, [ids], sampling, eos_id=tokenizer.eos_id, pad_id=pad_id, decoder=decoder)
    yield from stream_pieces(tokenizer, ids, steps, sampling)


def stream_pieces(
    tokenizer, ids: list[int], steps: Iterable[Sequence[int | None]], sampling: Sampling
) -> Iterator[str]:
    """The text of one row's new tokens (``steps`` in `generate_tokens`' protocol) piece by piece, decoded
    after the prompt ``ids``, ending at eos (when ``sampling.stop_at_eos``) or at a stop string."""
    produced: list[int] = []
    held, text = StopStrings(sampling.stop), ""
    for step in steps:
        token = step[0]
        if token is None or (token == tokenizer.eos_id and sampling.stop_at_eos):
            break
        produced.append(token)
        text = decode_after(tokenizer, ids, produced)
        if piece := held.feed(text):
            yield piece
        if held.stopped:
            return
    if piece := held.flush(text):
        yield piece


def generate(
    model: FlashLM,
    tokenizer,
    prompts: str | Sequence[str],
    sampling: Sampling | None = None,
    add_bos: bool = True,
    decoder: str = "fast",
) -> str | list[str]:
    """Complete one prompt (returns a string) or a batch of prompts (returns a list); ``decoder`` as in
    `generate_tokens`."""
    sampling = sampling or Sampling()
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    encoded = [tokenizer.encode(t, add_bos=add_bos) for t in texts]
    outputs: list[list[int]] = [[] for _ in texts]
    pad_id = tokenizer.pad_id or 0
    for step in generate_tokens(model, encoded, sampling, eos_id=tokenizer.eos_id, pad_id=pad_id, decoder=decoder):
        for row, token in enumerate(step):
            if token is not None and not (sampling.stop_at_eos and token == tokenizer.eos_id):
                outputs[row].append(token)
    results = []
    for context, ids in zip(encoded, outputs, strict=True):
        text = decode_after(tokenizer, context, ids)
        cut = _stop_index(text, sampling.stop)
        results.append(text if cut is None else text[:cut])
    return results[0] if single else results


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _stop_index(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


__all__ = [
    "DECODERS",
    "Sampling",
    "StopStrings",
    "beam_search",
    "beam_search_core",
    "decode_after",
    "generate",
    "generate_tokens",
    "greedy_decode",
    "length_batches",
    "next_token_scores",
    "pick",
    "safe_probs",
    "sequence_logprob",
    "stream",
]

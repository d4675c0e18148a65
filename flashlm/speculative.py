"""Speculative decoding: a small draft model proposes tokens, the target model checks them in one pass.

Each round the draft continues the text by up to ``lookahead`` tokens, one forward pass each over its own
KV cache; the target then scores every proposed position in a single forward pass over its cache, and
keeps the longest run of proposals it agrees with plus one token of its own:

- greedy (temperature 0): a proposal is kept while it is the target's argmax; the first disagreement is
  replaced by the target's argmax, and when every proposal is kept the target adds the next token. The
  output is the target's own greedy output.
- sampling: proposal x, drawn from the draft's distribution q, is kept with probability
  min(1, p(x) / q(x)) where p is the target's; the first rejected one is replaced by a draw from
  normalize(max(0, p - q)), and when every proposal is kept a bonus token is drawn from p. Every token
  is then distributed exactly as the target alone would sample it (the rule of Leviathan et al. 2023 and
  Chen et al. 2023). p and q are taken after the same `Sampling` transforms plain generation applies
  (repetition penalty, temperature, top-k, top-p; `next_token_scores`), so it is the target's *sampled*
  distribution that is kept.

The draft's steps run through `DecodeStep` and the target's checking passes through `ChunkStep`, which
prepare once what does not change between steps. After a round both caches are cut back to the kept
tokens (`KVCache.truncate`); their rings keep ``lookahead`` spare entries for that. What a round costs
decides the gain: about ``lookahead`` draft steps plus one checking pass, against the tokens it gives
out, which grow with how often the target agrees with the draft.

The draft must share the target's tokenizer (a student distilled from it, as `flashlm train` with a
`distill` section makes). One sequence at a time: batch 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flashlm.errors import CheckpointError, ConfigError
from flashlm.generation import DECODERS, Sampling, next_token_scores, pick, stream_pieces
from flashlm.model.cache import KVCache
from flashlm.model.chunk_step import ChunkStep
from flashlm.model.decoding import DecodeStep
from flashlm.model.transformer import FlashLM

DEFAULT_LOOKAHEAD = 4


@dataclass
class SpeculativeStats:
    """What the rounds of one or more generations did: proposals made and kept, target passes."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0  # target forward passes
    tokens: int = 0  # tokens given out

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0


def check_draft(target: FlashLM, draft: FlashLM, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Raise a one-line error unless `draft` can propose tokens for `target`: same vocabulary, and the
    same tokenizer when both are given."""
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise CheckpointError(
            f"the draft model's vocabulary ({draft.cfg.vocab_size} tokens) differs from the target's "
            f"({target.cfg.vocab_size}); the draft must use the target's tokenizer"
        )
    both = target_tokenizer is not None and draft_tokenizer is not None
    if both and target_tokenizer.fingerprint != draft_tokenizer.fingerprint:
        raise CheckpointError(
            "the draft model's tokenizer.json differs from the target's; the draft must use the "
            "target's tokenizer (a student distilled from it does)"
        )


def load_draft(
    draft_dir: str | Path, target: FlashLM, tokenizer, device: str | torch.device = "cpu", dtype=None
) -> FlashLM:
    """Load a draft model directory and check it against the target and its tokenizer."""
    from flashlm.tokenizer import Tokenizer

    draft_dir = Path(draft_dir)
    if not draft_dir.is_dir():
        raise CheckpointError(f"--draft {draft_dir}: no such model directory")
    draft = FlashLM.from_pretrained(draft_dir, device=device, dtype=dtype)
    draft_tokenizer = Tokenizer.load(draft_dir) if (draft_dir / "tokenizer.json").is_file() else None
    if draft_tokenizer is None:
        raise CheckpointError(f"--draft {draft_dir}: no tokenizer.json to check against the target's")
    check_draft(target, draft, tokenizer, draft_tokenizer)
    return draft


def _logits(model: FlashLM, ids: torch.Tensor, last: int, mode: str, prefix_len, cache: KVCache) -> torch.Tensor:
    """Logits [last, V] of the final `last` positions of `ids` [1, T] (the head runs on those only)."""
    hidden = model(ids, mode=mode, prefix_len=prefix_len, cache=cache, compute_logits=False).hidden
    return model.logits(hidden[0, -last:])


def _draft_logits(draft: FlashLM, step, seq: torch.Tensor, end: int, mode: str, prefix_len, cache: KVCache):
    """The draft's logits [1, V] after seq[:end], feeding what its cache lacks: the prompt in one
    forward pass, later tokens (one or two a round) through its decode step."""
    if step is None or cache.seen == 0 or end - cache.seen > 2:
        return _logits(draft, seq[:, cache.seen : end], 1, mode, prefix_len, cache)
    while cache.seen < end:
        logits = step(seq[:, cache.seen])
    return logits


def _scores(logits: torch.Tensor, seq: torch.Tensor, start: int, s: Sampling) -> torch.Tensor:
    """`next_token_scores` of each row i of `logits` [R, V], whose history is seq[:start + i]."""
    if s.repetition_penalty == 1.0:  # the history plays no part: all rows at once
        return next_token_scores(logits, None, s)
    return torch.cat([next_token_scores(logits[i : i + 1], seq[:, : start + i], s) for i in range(len(logits))])


@torch.no_grad()
def speculative_tokens(
    target: FlashLM,
    draft: FlashLM,
    prompt: Sequence[int],
    sampling: Sampling,
    eos_id: int | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    stats: SpeculativeStats | None = None,
    decoder: str = "fast",
) -> Iterator[list[int | None]]:
    """Yield the continuation of one prompt a token at a time, as ``[token]`` (the protocol of
    `generate_tokens` with one row): the same budget, eos and prefix-LM handling. ``decoder`` runs the
    draft's one-token steps as in `generate_tokens` ("fast", "compiled" or "reference"); the target's
    checking passes, several tokens at once, go through `ChunkStep` (`FlashLM.forward` for the first,
    which holds the prompt, and under "reference")."""
    if lookahead < 1:
        raise ConfigError(f"--lookahead must be at least 1, got {lookahead}")
    if len(prompt) == 0:
        raise ValueError("every prompt needs at least one token (start from <bos>)")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        check_draft(target, draft)
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    stats = stats if stats is not None else SpeculativeStats()
    device = next(target.parameters()).device
    budget = min(sampling.max_new_tokens, target.cfg.max_seq_len - len(prompt))
    if budget <= 0:
        return
    total = len(prompt) + budget
    draft_room = min(total, draft.cfg.max_seq_len)  # positions the draft may fill
    t_cache = KVCache(target.cfg, 1, total, device, next(target.parameters()).dtype, lookahead=lookahead)
    # the compiled step keeps one cache length (the draft's whole context), so later prompts reuse its graph
    d_len = draft.cfg.max_seq_len if decoder == "compiled" else draft_room
    d_cache = KVCache(draft.cfg, 1, d_len, device, next(draft.parameters()).dtype, lookahead=lookahead)
    d_step = None if decoder == "reference" else DecodeStep(draft, d_cache, compile=decoder == "compiled")
    chunked = decoder != "reference" and target.cfg.attn_softcap is None
    t_step = ChunkStep(target, t_cache) if chunked else None
    mode = "prefix" if sampling.prefix_lm else "causal"
    prefix_len = torch.tensor([len(prompt)], device=device) if sampling.prefix_lm else None
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    greedy = sampling.temperature <= 0
    seq = torch.zeros(1, total, dtype=torch.long, device=device)  # the prompt, then every kept token
    seq[0, : len(prompt)] = torch.tensor(list(prompt), device=device)
    n = len(prompt)  # tokens in seq; after the first round the target's cache holds all but the last
    produced = 0
    while produced < budget:
        # the round gives out at most k + 1 tokens; the draft fills positions up to n + k - 2
        k = max(0, min(lookahead, budget - produced - 1, draft_room - n + 1))
        draft_probs = []
        for i in range(k):
            logits = _draft_logits(draft, d_step, seq, n + i, mode, prefix_len, d_cache)
            scores = _scores(logits, seq, n + i, sampling)
            seq[0, n + i] = pick(scores, sampling, generator)[0]
            if not greedy:
                draft_probs.append(scores.softmax(-1)[0])
        # the target scores positions n .. n + k in one pass: the prompt and the proposals in the first
        # round, then the last token it has not seen and the proposals
        if t_step is not None and t_cache.seen > 0:
            logits = t_step(seq[0, t_cache.seen : n + k])
        else:
            logits = _logits(target, seq[:, t_cache.seen : n + k], k + 1, mode, prefix_len, t_cache)
        scores = _scores(logits, seq, n, sampling)
        if greedy:
            kept, token = _accept_greedy(scores, seq[0, n : n + k])
        else:
            kept, token = _accept_sampled(scores.softmax(-1), draft_probs, seq[0, n : n + k], generator)
        seq[0, n + kept] = token
        new = seq[0, n : n + kept + 1].tolist()
        t_cache.truncate(n + kept)  # it saw seq[: n + k]; seq[n + kept] is new
        d_cache.truncate(min(d_cache.seen, n + kept))
        n += kept + 1
        stats.proposed += k
        stats.accepted += kept
        stats.rounds += 1
        for token in new:
            produced += 1
            stats.tokens += 1
            yield [token]
            if (eos_id is not None and sampling.stop_at_eos and token == eos_id) or produced == budget:
                return


def _accept_greedy(scores: torch.Tensor, proposed: torch.Tensor) -> tuple[int, int]:
    """(proposals kept, the target's token after them): keep while a proposal is the target's argmax."""
    choice = scores.argmax(-1)
    agree = (choice[: len(proposed)] == proposed).long().cumprod(0)
    kept = int(agree.sum())
    return kept, int(choice[kept])


def _accept_sampled(
    target_probs: torch.Tensor, draft_probs: list[torch.Tensor], proposed: torch.Tensor, generator
) -> tuple[int, int]:
    """(proposals kept, the next token) by the accept/reject rule; target_probs [k + 1, V]."""
    draws = torch.rand(len(proposed), generator=generator, device=proposed.device)
    for i, (q, x) in enumerate(zip(draft_probs, proposed.tolist(), strict=True)):
        p = target_probs[i]
        if draws[i] * q[x] < p[x]:  # u < p(x) / q(x), without dividing
            continue
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: the rejection had no mass to move
            residual = p
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(proposed), int(torch.multinomial(target_probs[-1], 1, generator=generator))


def speculative_stream(
    target: FlashLM,
    draft: FlashLM,
    tokenizer,
    prompt: str,
    sampling: Sampling,
    lookahead: int = DEFAULT_LOOKAHEAD,
    add_bos: bool = True,
    stats: SpeculativeStats | None = None,
) -> Iterator[str]:
    """`flashlm.generation.stream` with a draft model: the text of the continuation piece by piece,
    honouring stop strings and eos the same way."""
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    steps = speculative_tokens(target, draft, ids, sampling, tokenizer.eos_id, lookahead, stats)
    yield from stream_pieces(tokenizer, ids, steps, sampling)


def speculative_generate(
    target: FlashLM,
    draft: FlashLM,
    tokenizer,
    prompts: str | Sequence[str],
    sampling: Sampling | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    add_bos: bool = True,
    stats: SpeculativeStats | None = None,
) -> str | list[str]:
    """`flashlm.generation.generate` with a draft model; a list of prompts runs one prompt at a time."""
    sampling = sampling or Sampling()
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    results = [
        "".join(speculative_stream(target, draft, tokenizer, t, sampling, lookahead, add_bos, stats)) for t in texts
    ]
    return results[0] if isinstance(prompts, str) else results


__all__ = [
    "DEFAULT_LOOKAHEAD",
    "SpeculativeStats",
    "check_draft",
    "load_draft",
    "speculative_generate",
    "speculative_stream",
    "speculative_tokens",
]

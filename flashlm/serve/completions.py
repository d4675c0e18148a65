"""/v1/completions as OpenAI's completions API defines it: text or token-id prompts, `n` choices, `echo`, `logprobs`.

This is the API that lm-eval's `local-completions` model (and vLLM-style clients) drive: a log-likelihood
request is ``{"prompt": [[ids…]], "echo": true, "max_tokens": 1, "logprobs": 1}`` and reads
``choices[i].logprobs.token_logprobs`` of the echoed prompt. Conventions:

- A string prompt is framed as generation frames it: ``<bos>`` + its tokens. With `echo` that ``<bos>``
  is the first token reported (text "", logprob None), so every token of the text has a log-probability
  conditioned on ``<bos>``, as `flashlm eval ppl` scores documents. A token-id prompt is used verbatim (no
  ``<bos>`` is added; its first token's logprob is None).
- `logprobs` are the model's own distribution (log-softmax of the logits, before temperature, top-k/p and
  penalties), computed by one forward pass over prompt + completion after generation (`token_scores`),
  the same teacher-forced scores `flashlm.evaluate.lm` sums. A completion that ended at ``<eos>`` reports
  that token too (text ""), so ``max_tokens: 1`` always reports one generated token, as lm-eval expects.
- `text_offset` counts characters into prompt + completion text, with or without `echo` (OpenAI's way).
- Choice ``index`` is ``prompt_index * n + j``; with a `seed`, choice j samples with seed + j, so every
  choice is reproducible and the n choices differ.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flashlm.errors import FlashLMError
from flashlm.evaluate.lm import collate
from flashlm.generation import Sampling
from flashlm.serve.engine import Engine, Run

MAX_LOGPROBS = 5  # OpenAI's limit for the completions API
MAX_CHOICES = 64  # prompts × n in one request


class RequestError(FlashLMError):
    """A request the model cannot answer; the route turns it into a 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what `echo` returns: the prompt string as sent, or the decoded token ids


@dataclass
class Choice:
    """One generated choice: its text, why it ended, and the ids it was generated as."""

    prompt: Prompt
    text: str = ""
    finish_reason: str = "length"
    token_ids: list[int] = field(default_factory=list)  # generated ids that make up `text` (+ a final <eos>)
    run: Run | None = None


# ---- prompts -----------------------------------------------------------------------------------------
def read_prompts(engine: Engine, prompt: Any, max_tokens: int) -> list[Prompt]:
    """The prompts of a request (a string, a list of strings, a list of ids, a list of id lists), checked
    against the vocabulary and the context (with room for one new token unless `max_tokens` is 0)."""
    tok, context, vocab = engine.tokenizer, engine.context, engine.model.cfg.vocab_size
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    prompts = []
    for i, item in enumerate(prompt):
        where = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids, text = engine.encode(item), item  # framed as generation frames a prompt (<bos> first)
        else:
            ids = list(item)
            if not ids:
                raise RequestError(f"{where} is an empty list of token ids; give at least one", "prompt")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise RequestError(
                    f"{where} holds token id {bad[0]}, outside the vocabulary (0..{vocab - 1})", "prompt"
                )
            text = tok.decode(ids)
        room = 0 if max_tokens == 0 else 1
        if len(ids) + room > context:
            raise RequestError(
                f"{where} is {len(ids)} tokens but the model's context is {context} tokens; shorten it"
                + (" to leave room for the reply (or score it alone with max_tokens 0)" if room else ""),
                "prompt",
            )
        prompts.append(Prompt(ids, text))
    return prompts


# ---- scoring -----------------------------------------------------------------------------------------
@torch.no_grad()
def token_scores(
    model: Any, ids: Sequence[int], top: int = 0
) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """Teacher-forced log-probabilities of `ids` in one forward pass: for every token, log p(ids[i] | ids[:i])
    (None for the first, which has no context) and the `top` likeliest ids at its position with theirs
    (an empty list for the first). Scores are fp32 log-softmax of the model's logits."""
    ids = [int(t) for t in ids]
    if len(ids) < 2:
        return [None] * len(ids), [[] for _ in ids]
    device = next(model.parameters()).device
    inputs, _ = collate([(ids[:-1], ids[1:])])
    logp = model(inputs.to(device), mode="causal").logits.float()[0].log_softmax(-1)  # [T-1, V]
    targets = torch.tensor(ids[1:], device=logp.device)
    picked = logp.gather(-1, targets[:, None]).squeeze(-1).tolist()
    tops: list[list[tuple[int, float]]] = [[]]
    if top > 0:
        values, indices = logp.topk(min(top, logp.shape[-1]), dim=-1)
        tops += [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops += [[] for _ in picked]
    return [None, *picked], tops


def _piece(tok: Any, context: Sequence[int], token: int) -> str:
    """How `token` reads after `context`: special tokens by name, others decoded in context."""
    if token in tok.special_ids:
        return tok.backend.id_to_token(token) or ""
    return tok.decode_continuation(context, [token])


def logprobs_block(engine: Engine, choice: Choice, echo: bool, top: int) -> dict:
    """OpenAI's ``logprobs`` object for one choice: tokens, token_logprobs, top_logprobs, text_offset."""
    tok, prompt = engine.tokenizer, choice.prompt
    ids = prompt.ids + choice.token_ids
    logprobs, tops = token_scores(engine.model, ids, top)
    first = 0 if echo else len(prompt.ids)
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for i in range(first, len(ids)):
        piece = _piece(tok, ids[:i], ids[i])
        if i == len(prompt.ids):
            offset = len(prompt.text)  # completion offsets start where the prompt text ends
        out["tokens"].append(piece)
        out["token_logprobs"].append(logprobs[i])
        out["top_logprobs"].append(None if i == 0 else {_piece(tok, ids[:i], t): lp for t, lp in tops[i]})
        out["text_offset"].append(offset)
        if ids[i] not in tok.special_ids:
            offset += len(piece)
    return out


def _eos_stopped(engine: Engine, choice: Choice, stops: Sequence[str]) -> bool:
    """Whether generation ended at `<eos>` (not a stop string): the generated text holds no stop string."""
    if choice.finish_reason != "stop" or engine.tokenizer.eos_id is None:
        return False
    produced = engine.tokenizer.decode_continuation(choice.prompt.ids, choice.run.token_ids if choice.run else [])
    return not any(s in produced for s in stops)


def _kept_ids(engine: Engine, choice: Choice) -> list[int]:
    """The generated ids whose text is part of the choice's text (a stop string cuts the rest off)."""
    tok, kept, length = engine.tokenizer, [], 0
    for token in choice.run.token_ids if choice.run else []:
        if length >= len(choice.text):
            break
        length += len(_piece(tok, choice.prompt.ids + kept, token))  # one short decode a token
        kept.append(token)
    return kept


# ---- the request -------------------------------------------------------------------------------------
def choice_samplings(sampling: Sampling, n: int) -> list[Sampling]:
    """n settings for n choices: with a seed, choice j samples with seed + j (reproducible, distinct)."""
    if sampling.seed is None:
        return [sampling] * n
    return [replace(sampling, seed=(sampling.seed + j) % 2**63) for j in range(n)]


def complete(
    engine: Engine,
    prompts: list[Prompt],
    sampling: Sampling,
    n: int,
    echo: bool,
    top: int | None,
    cancel: threading.Event | None = None,
) -> dict:
    """The non-streamed response body's choices and usage (the caller adds id/object/created/model).
    Runs in a worker thread holding nothing: generation takes `generating()`, scoring the model lock."""
    choices: list[Choice] = []
    for prompt in prompts:
        for s in choice_samplings(sampling, n):
            choice = Choice(prompt)
            if s.max_new_tokens > 0:
                run = Run(len(prompt.ids))
                with engine.generating():
                    choice.text = "".join(engine.pieces(prompt.ids, s, run, cancel=cancel))
                choice.run, choice.finish_reason = run, run.finish_reason or "length"
                if top is not None:  # the ids only `logprobs_block` reads
                    choice.token_ids = _kept_ids(engine, choice)
                    if _eos_stopped(engine, choice, s.stop):
                        choice.token_ids.append(engine.tokenizer.eos_id)
            choices.append(choice)
    body = []
    for index, choice in enumerate(choices):
        logprobs = None
        if top is not None:
            with engine.lock:
                logprobs = logprobs_block(engine, choice, echo, top)
        text = (choice.prompt.text if echo else "") + choice.text
        body.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason})
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion = sum(c.run.completion_tokens for c in choices if c.run is not None)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    return {"choices": body, "usage": usage}


def stream_choices(
    engine: Engine, prompts: list[Prompt], sampling: Sampling, n: int, echo: bool, cancel: threading.Event
) -> Iterator[tuple[int, str, str | None, Run | None]]:
    """(index, text piece, finish_reason or None, the finished choice's run) for a streamed response: each
    choice's pieces in turn (the echoed prompt first), then its end. The caller holds `generating()`."""
    index = 0
    for prompt in prompts:
        for j, s in enumerate(choice_samplings(sampling, n)):
            if echo and prompt.text:
                yield index, prompt.text, None, None
            run = Run(len(prompt.ids) if j == 0 else 0)  # usage counts a prompt once, however many choices
            if s.max_new_tokens > 0:
                for piece in engine.pieces(prompt.ids, s, run, cancel=cancel):
                    yield index, piece, None, None
            yield index, "", run.finish_reason or "length", run
            index += 1


def completion_head(engine: Engine) -> dict:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": engine.name,
    }

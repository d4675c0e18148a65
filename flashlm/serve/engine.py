"""One loaded model: text completion pieces with token counts, and the chat template.

Shared by the HTTP server (`serve/app.py`) and the terminal chat (`flashlm chat`); it imports no web
framework. Streaming and non-streaming calls run the same code, so their texts agree exactly.

Two ways to share the model between concurrent requests (`batching`): "continuous" (the default) hands
every request to a `Scheduler` (`serve/batching.py`) that decodes all running requests as one batch,
admitting and retiring rows at every step; "serial" runs one request at a time behind `lock`. With a
draft model, decoding is speculative and serial. `flashlm chat` serves one person, so it runs serial.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

# The chat template lives in flashlm/chat.py (below interop, so exported tokenizers carry the same one).
from flashlm.chat import CHAT_STOP, chat_prompt
from flashlm.generation import Sampling, StopStrings, generate_tokens
from flashlm.model.transformer import FlashLM
from flashlm.serve.batching import DEFAULT_KV_BUDGET_MB, DEFAULT_MAX_BATCH, Scheduler
from flashlm.speculative import DEFAULT_LOOKAHEAD, load_draft, speculative_tokens

BATCHING = ("continuous", "serial")


@dataclass
class Run:
    """What one generation produced besides its text; filled in as the pieces are consumed."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (eos or a stop string), "length", "cancelled"
    token_ids: list[int] = field(default_factory=list)  # the tokens generated (completion logprobs)


class Engine:
    """A model and its tokenizer. `lock` guards every use of the model: the scheduler holds it for
    each batched step, serial generation and other model work (explanations) for their whole run.

    With a `draft` model (same tokenizer) every generation is speculative (`flashlm.speculative`):
    the same text under greedy decoding, the same distribution under sampling, sooner; it is serial."""

    def __init__(
        self,
        model: FlashLM,
        tokenizer,
        name: str = "flashlm",
        draft: FlashLM | None = None,
        lookahead: int = DEFAULT_LOOKAHEAD,
        draft_name: str = "draft",
        batching: str = "continuous",
        max_batch: int = DEFAULT_MAX_BATCH,
        kv_budget_mb: int = DEFAULT_KV_BUDGET_MB,
    ) -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.draft, self.lookahead, self.draft_name = draft, lookahead, draft_name
        self.lock = threading.Lock()
        self.scheduler: Scheduler | None = None
        if batching == "continuous" and draft is None:
            self.scheduler = Scheduler(model, tokenizer.eos_id, self.lock, max_batch, kv_budget_mb * 2**20)
        self.batching = "serial" if self.scheduler is None else "continuous"

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str = "cpu",
        name: str | None = None,
        precision: str = "auto",
        draft_dir: str | Path | None = None,
        lookahead: int = DEFAULT_LOOKAHEAD,
        batching: str = "continuous",
        max_batch: int = DEFAULT_MAX_BATCH,
        kv_budget_mb: int = DEFAULT_KV_BUDGET_MB,
    ) -> Engine:
        """Load a model directory (and a draft model for speculative decoding); `precision` as in
        `flashlm.hardware.resolve_precision` (bf16 weights on CUDA and native-bf16 CPUs under "auto").
        A run's `latest` link is named after its run."""
        from flashlm.hardware import default_device, dtype_of, resolve_precision
        from flashlm.tokenizer import Tokenizer

        device = str(default_device(device))  # a bad name or absent CUDA: one line
        dtype = dtype_of(resolve_precision(precision, device))
        model = FlashLM.from_pretrained(model_dir, device=device, dtype=dtype)
        tokenizer = Tokenizer.load(model_dir)
        tokenizer.check_fits(model.cfg.vocab_size, model_dir)
        draft = None if draft_dir is None else load_draft(draft_dir, model, tokenizer, device, dtype)
        draft_name = "draft" if draft_dir is None else _run_name(draft_dir)
        name = name or _run_name(model_dir)
        return cls(model, tokenizer, name, draft, lookahead, draft_name, batching, max_batch, kv_budget_mb)

    def generating(self):
        """What a caller of `pieces` holds around it: `lock` when generation is serial, nothing when the
        scheduler batches (it takes the lock for each step itself)."""
        return self.lock if self.scheduler is None else nullcontext()

    def close(self) -> None:
        """Stop the scheduler thread (requests still running end)."""
        if self.scheduler is not None:
            self.scheduler.close()

    def token_steps(
        self, ids: list[int], sampling: Sampling, cancel: threading.Event | None = None
    ) -> Iterator[list[int | None]]:
        """The new tokens of one prompt, step by step (`generate_tokens`' protocol): from the scheduler's
        batch, or decoded here under `lock` (speculative with a draft)."""
        tok = self.tokenizer
        if self.scheduler is not None:
            return self.scheduler.submit(ids, sampling).steps(cancel)
        if self.draft is not None:
            return speculative_tokens(self.model, self.draft, ids, sampling, tok.eos_id, self.lookahead)
        return generate_tokens(self.model, [ids], sampling, eos_id=tok.eos_id, pad_id=tok.pad_id or 0)

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_bos=True)

    def fit_chat(self, messages: list[dict], reserve: int = 32) -> list[dict]:
        """Drop the oldest turns (system messages stay) until the prompt leaves `reserve` tokens free."""
        messages = list(messages)
        while len(self.encode(chat_prompt(messages))) > self.context - reserve:
            turns = [i for i, m in enumerate(messages) if m["role"] != "system"]
            if len(turns) <= 1:
                break
            del messages[turns[0]]
        return messages

    def pieces(
        self, ids: list[int], sampling: Sampling, run: Run, lstrip: bool = False, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """Yield the continuation of `ids` piece by piece (the caller holds `generating()`).

        Stop strings are honoured even across tokens: text that could begin a stop string is held back
        until it is known not to, so streamed pieces join to exactly the non-streamed text. With
        `lstrip` the leading whitespace of the continuation is dropped (stop strings still match the
        text as generated, so a reply that starts with one is empty).
        """
        tok = self.tokenizer
        produced = run.token_ids  # kept on `run`: the completions API scores them for `logprobs`
        held: StopStrings | None = None if lstrip else StopStrings(sampling.stop)
        text = ""
        steps = self.token_steps(ids, sampling, cancel)
        try:
            for step in steps:
                if cancel is not None and cancel.is_set():
                    break
                token = step[0]
                if token is None or (sampling.stop_at_eos and token == tok.eos_id):
                    run.finish_reason = "stop"
                    break
                produced.append(token)
                run.completion_tokens += 1
                text = tok.decode_continuation(ids, produced)  # keeps a SentencePiece leading space
                if held is None:  # drop the whitespace that follows "Assistant:"
                    stripped = text.lstrip()
                    if not stripped:
                        continue
                    held = StopStrings(sampling.stop, emitted=len(text) - len(stripped))
                if piece := held.feed(text):
                    yield piece
                if held.stopped:
                    run.finish_reason = "stop"
                    return
            else:  # the steps ran out: the budget was spent, or the batched steps saw `cancel`
                run.finish_reason = "cancelled" if cancel is not None and cancel.is_set() else "length"
        finally:
            getattr(steps, "close", lambda: None)()  # a batched request leaves the batch at the next step
        if run.finish_reason in (None, "cancelled"):
            run.finish_reason = "cancelled"
            return
        if held is not None and (piece := held.flush(text)):
            yield piece


def _run_name(model_dir: str | Path) -> str:
    path = Path(model_dir)
    return path.parent.resolve().name if path.name == "latest" else path.resolve().name


def chat_repl(
    engine: Engine,
    sampling: Sampling,
    lines: Iterable[str],
    write: Callable[[str], None],
    system: str | None = None,
    interactive: bool = False,
) -> list[dict]:
    """A terminal chat: one user message a line, the reply streamed to `write`; returns the history.

    "/reset" forgets the conversation, "/exit" (or the end of `lines`) ends it. The oldest turns are
    dropped when the conversation outgrows the context.
    """
    sampling = replace(sampling, stop=(CHAT_STOP, *sampling.stop))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    reserve = max(1, min(sampling.max_new_tokens, engine.context // 2))
    if interactive:
        write("you> ")
    for line in lines:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            write("(conversation cleared)\n")
        elif text:
            messages = engine.fit_chat([*messages, {"role": "user", "content": text}], reserve)
            ids = engine.encode(chat_prompt(messages))
            if len(ids) >= engine.context:
                messages.pop()
                write(f"(that message is {len(ids)} tokens; the context holds {engine.context}: skipped)\n")
            else:
                if interactive:
                    write("assistant> ")
                reply = []
                with engine.generating():
                    for piece in engine.pieces(ids, sampling, Run(len(ids)), lstrip=True):
                        reply.append(piece)
                        write(piece)
                write("\n")
                messages.append({"role": "assistant", "content": "".join(reply)})
        if interactive:
            write("you> ")
    return messages

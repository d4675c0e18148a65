"""One loaded model behind a lock: text completion pieces with token counts, and the chat template.

Shared by the HTTP server (`serve/app.py`) and the terminal chat (`flashlm chat`); it imports no web
framework. Streaming and non-streaming calls run the same code, so their texts agree exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from flashlm.generation import Sampling, StopStrings, generate_tokens
from flashlm.model.transformer import FlashLM
from flashlm.speculative import DEFAULT_LOOKAHEAD, load_draft, speculative_tokens

# A plain-text chat template a base model can follow; generation stops when it starts the next user turn.
ROLE_PREFIX = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"


def chat_prompt(messages: Sequence[dict]) -> str:
    """Render [{"role", "content"}, ...] as "System: …\\nUser: …\\nAssistant: …\\n…User: …\\nAssistant:"."""
    lines = [f"{ROLE_PREFIX[m['role']]}: {m['content'].strip()}" for m in messages]
    return "\n".join(lines) + f"\n{ROLE_PREFIX['assistant']}:"


@dataclass
class Run:
    """What one generation produced besides its text; filled in as the pieces are consumed."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (eos or a stop string), "length", "cancelled"


class Engine:
    """A model and its tokenizer; `lock` serialises every use of the model (one request at a time).

    With a `draft` model (same tokenizer) every generation is speculative (`flashlm.speculative`):
    the same text under greedy decoding, the same distribution under sampling, sooner."""

    def __init__(
        self,
        model: FlashLM,
        tokenizer,
        name: str = "flashlm",
        draft: FlashLM | None = None,
        lookahead: int = DEFAULT_LOOKAHEAD,
        draft_name: str = "draft",
    ) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.draft, self.lookahead, self.draft_name = draft, lookahead, draft_name
        self.lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str = "cpu",
        name: str | None = None,
        precision: str = "auto",
        draft_dir: str | Path | None = None,
        lookahead: int = DEFAULT_LOOKAHEAD,
    ) -> Engine:
        """Load a model directory (and a draft model for speculative decoding); `precision` as in
        `flashlm.hardware.resolve_precision` (bf16 weights on CUDA and native-bf16 CPUs under "auto").
        A run's `latest` link is named after its run."""
        from flashlm.hardware import dtype_of, resolve_precision
        from flashlm.tokenizer import Tokenizer

        dtype = dtype_of(resolve_precision(precision, device))
        model = FlashLM.from_pretrained(model_dir, device=device, dtype=dtype)
        tokenizer = Tokenizer.load(model_dir)
        draft = None if draft_dir is None else load_draft(draft_dir, model, tokenizer, device, dtype)
        draft_name = "draft" if draft_dir is None else _run_name(draft_dir)
        return cls(model, tokenizer, name or _run_name(model_dir), draft, lookahead, draft_name)

    def token_steps(self, ids: list[int], sampling: Sampling) -> Iterator[list[int | None]]:
        """The new tokens of one prompt, step by step (`generate_tokens`' protocol), speculative with a draft."""
        tok = self.tokenizer
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
        """Yield the continuation of `ids` piece by piece (the caller holds `lock`).

        Stop strings are honoured even across tokens: text that could begin a stop string is held back
        until it is known not to, so streamed pieces join to exactly the non-streamed text. With
        `lstrip` the leading whitespace of the continuation is dropped (stop strings still match the
        text as generated, so a reply that starts with one is empty).
        """
        tok = self.tokenizer
        produced: list[int] = []
        held: StopStrings | None = None if lstrip else StopStrings(sampling.stop)
        text = ""
        for step in self.token_steps(ids, sampling):
            if cancel is not None and cancel.is_set():
                run.finish_reason = "cancelled"
                return
            token = step[0]
            if token is None or (sampling.stop_at_eos and token == tok.eos_id):
                run.finish_reason = "stop"
                break
            produced.append(token)
            run.completion_tokens += 1
            text = tok.decode(produced)
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
        else:
            run.finish_reason = "length"
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
                with engine.lock:
                    for piece in engine.pieces(ids, sampling, Run(len(ids)), lstrip=True):
                        reply.append(piece)
                        write(piece)
                write("\n")
                messages.append({"role": "assistant", "content": "".join(reply)})
        if interactive:
            write("you> ")
    return messages

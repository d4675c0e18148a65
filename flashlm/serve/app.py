"""An OpenAI-compatible HTTP API over one FlashLM model, plus the web playground.

    GET  /                      the playground page (static/index.html; no network needed)
    GET  /health                {"status": "ok", "model": ...} (+ "draft": ... when decoding is speculative)
    GET  /v1/models             the one model this process serves (and its draft model, if any)
    POST /v1/completions        prompt → text; "stream": true sends server-sent events
    POST /v1/chat/completions   messages → a reply, through a plain "User: …\\nAssistant:" template
    POST /v1/explain            attention maps and token saliency (JSON) for the playground

Generation is CPU/GPU-bound and not thread-safe, so it runs in worker threads behind one lock: the
event loop stays free to accept requests, answer /health, and notice clients that hang up. Bad
requests get HTTP 400 with an OpenAI-style {"error": {"message", "type", "param"}} body. Served with a
draft model (`flashlm serve MODEL --draft DRAFT`), every request decodes speculatively, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from flashlm.errors import FlashLMError
from flashlm.generation import Sampling
from flashlm.serve.engine import CHAT_STOP, Engine, Run, chat_prompt
from flashlm.speculative import DEFAULT_LOOKAHEAD

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
EXPLAIN_MAX_TOKENS = 256  # an explain request's JSON grows with tokens²


# ---- request bodies ----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat. Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # one model per process: any name is answered by it
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def sampling(self, max_tokens: int, extra_stop: tuple[str, ...] = ()) -> Sampling:
        return Sampling(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p if self.top_p < 1.0 else None,
            repetition_penalty=self.repetition_penalty,
            stop=(*extra_stop, *(self.stop or ())),
            seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(..., description="one prompt, or a list (one choice each)")
    max_tokens: int = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and not 1 <= len(value) <= 16:
            raise ValueError("give 1 to 16 prompts")
        return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ExplainRequest(BaseModel):
    text: str = Field(..., min_length=1)
    layer: int | None = Field(None, ge=0, description="None: average over layers")
    head: int | None = Field(None, ge=0, description="None: average over heads")
    target: str | None = Field(None, min_length=1, description="next token to explain; default the likeliest")
    saliency: bool = True


# ---- the app -----------------------------------------------------------------------------------------
def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app around a loaded `Engine` (tests pass a tiny model; `serve` loads one from disk)."""
    app = FastAPI(title="FlashLM", summary="OpenAI-compatible API for a FlashLM model", docs_url="/docs")
    app.state.engine = engine
    cfg = engine.model.cfg
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground() -> str:
        return resources.files("flashlm.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict:
        if engine.draft is None:
            return {"status": "ok", "model": engine.name}
        return {"status": "ok", "model": engine.name, "draft": engine.draft_name}

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "flashlm",
                    "context_length": cfg.max_seq_len,
                    "n_layers": cfg.n_layers,
                    "n_heads": cfg.n_heads,
                    **(_draft_info(engine) if engine.draft is not None else {}),
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        encoded = [_encode_checked(engine, p, "prompt") for p in prompts]
        sampling = req.sampling(req.max_tokens)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": engine.name,
        }

        def choice(index: int, text: str, finish: str | None) -> dict:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        if req.stream:

            def events(cancel: threading.Event) -> Iterator[dict]:
                runs = []
                for index, ids in enumerate(encoded):
                    runs.append(Run(len(ids)))
                    for piece in engine.pieces(ids, sampling, runs[-1], cancel=cancel):
                        yield {**head, "choices": [choice(index, piece, None)]}
                    yield {**head, "choices": [choice(index, "", runs[-1].finish_reason)]}
                if req.include_usage:
                    yield {**head, "choices": [], "usage": _usage(runs)}

            return _sse(engine, events)

        def work() -> list[tuple[str, Run]]:
            results = []
            for ids in encoded:
                run = Run(len(ids))
                results.append(("".join(engine.pieces(ids, sampling, run)), run))
            return results

        results = await _locked(engine, work)
        return {
            **head,
            "choices": [choice(i, text, run.finish_reason) for i, (text, run) in enumerate(results)],
            "usage": _usage([run for _, run in results]),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        prompt = chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        ids = _encode_checked(engine, prompt, "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens or cfg.max_seq_len
        sampling = req.sampling(max_tokens, extra_stop=(CHAT_STOP,))
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": engine.name,
        }

        if req.stream:
            head["object"] = "chat.completion.chunk"

            def events(cancel: threading.Event) -> Iterator[dict]:
                run = Run(len(ids))
                first = {"role": "assistant", "content": ""}
                yield {**head, "choices": [{"index": 0, "delta": first, "finish_reason": None}]}
                for piece in engine.pieces(ids, sampling, run, lstrip=True, cancel=cancel):
                    yield {**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": run.finish_reason}]}
                if req.include_usage:
                    yield {**head, "choices": [], "usage": _usage([run])}

            return _sse(engine, events)

        def work() -> tuple[str, Run]:
            run = Run(len(ids))
            return "".join(engine.pieces(ids, sampling, run, lstrip=True)), run

        text, run = await _locked(engine, work)
        message = {"role": "assistant", "content": text}
        return {
            **head,
            "choices": [{"index": 0, "message": message, "finish_reason": run.finish_reason}],
            "usage": _usage([run]),
        }

    @app.post("/v1/explain")
    async def explain(req: ExplainRequest):
        from flashlm.explain import explain as explain_text

        for name, value, limit in (("layer", req.layer, cfg.n_layers), ("head", req.head, cfg.n_heads)):
            if value is not None and value >= limit:
                raise _bad_request(f"{name} must be below {limit} (the model has {limit} {name}s)", name)
        return await _locked(
            engine,
            lambda: explain_text(
                engine.model,
                engine.tokenizer,
                req.text,
                layer=req.layer,
                head=req.head,
                target=req.target,
                with_saliency=req.saliency,
                max_tokens=EXPLAIN_MAX_TOKENS,
            ),
        )

    return app


def load_app(
    model_dir: str | Path,
    device: str = "cpu",
    precision: str = "auto",
    draft_dir: str | Path | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
) -> FastAPI:
    engine = Engine.load(model_dir, device=device, precision=precision, draft_dir=draft_dir, lookahead=lookahead)
    return create_app(engine)


def serve(
    model_dir: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str = "cpu",
    log_level: str = "info",
    precision: str = "auto",
    draft_dir: str | Path | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
) -> None:
    """Load the model (and its draft) and serve it with uvicorn until interrupted (loopback only unless
    `host` says so)."""
    import sys

    import uvicorn

    app = load_app(model_dir, device, precision, draft_dir, lookahead)
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    engine = app.state.engine
    drafted = f" (speculative, draft {engine.draft_name}, lookahead {engine.lookahead})" if engine.draft else ""
    print(f"serving {engine.name}{drafted}: playground at http://{shown}:{port}/, API at /v1", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


# ---- helpers -----------------------------------------------------------------------------------------
def _draft_info(engine: Engine) -> dict:
    """What /v1/models says of a draft model: generation is speculative, with this draft."""
    return {
        "draft": {
            "id": engine.draft_name,
            "n_layers": engine.draft.cfg.n_layers,
            "lookahead": engine.lookahead,
        }
    }


class _BadRequest(HTTPException):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(400, message)
        self.param = param


def _bad_request(message: str, param: str | None = None) -> _BadRequest:
    return _BadRequest(message, param)


def _encode_checked(engine: Engine, text: str, param: str) -> list[int]:
    ids = engine.encode(text)
    if len(ids) >= engine.context:
        raise _bad_request(
            f"the {param} is {len(ids)} tokens but the model's context is {engine.context} "
            "tokens; shorten it to leave room for the reply",
            param,
        )
    return ids


def _usage(runs: list[Run]) -> dict:
    prompt = sum(r.prompt_tokens for r in runs)
    completion = sum(r.completion_tokens for r in runs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _locked(engine: Engine, fn: Callable):
    """Run `fn` in a worker thread while holding the model lock (waiting for it there, not in the loop)."""

    def locked():
        with engine.lock:
            return fn()

    return await run_in_threadpool(locked)


def _sse(engine: Engine, events: Callable[[threading.Event], Iterator[dict]]) -> StreamingResponse:
    """Stream `events` as server-sent events from a worker thread; stop generating if the client leaves."""

    async def body():
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: the client left and the server moved on
                cancel.set()

        def work() -> None:
            try:
                with engine.lock:
                    for event in events(cancel):
                        if cancel.is_set():
                            break
                        put(("event", event))
            except Exception as exc:  # noqa: BLE001 - reported to the client as an error event
                put(("error", exc))
            finally:
                put(("end", None))

        threading.Thread(target=work, name="flashlm-generate", daemon=True).start()
        try:
            while True:
                kind, item = await queue.get()
                if kind == "event":
                    yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n"
                elif kind == "error":
                    error = {"message": f"generation failed: {type(item).__name__}: {item}", "type": "server_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                else:
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems, params = [], []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            where = ".".join(loc) or "body"
            params.append(where)
            message = err.get("msg", "invalid value").removeprefix("Value error, ")
            if err.get("type") == "json_invalid":
                where, message = "body", f"not valid JSON ({err.get('ctx', {}).get('error', message)})"
                params[-1] = where
            problems.append(f"{where}: {message}")
        return _error(
            400,
            "invalid request: " + "; ".join(dict.fromkeys(problems)),
            "invalid_request_error",
            params[0] if params else None,
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(exc.status_code, str(exc.detail), kind, getattr(exc, "param", None))

    @app.exception_handler(FlashLMError)
    async def user_error(request: Request, exc: FlashLMError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

"""An OpenAI-compatible HTTP API over one FlashLM model, plus the web playground.

    GET  /                      the playground page (static/index.html; no network needed)
    GET  /health                {"status": "ok", "model": ...} (+ "draft": ... when decoding is speculative)
    GET  /v1/models             the one model this process serves (and its draft model, if any)
    POST /v1/completions        prompt(s) → text; echo, logprobs, n, token-id prompts (serve/completions.py);
                                "stream": true sends server-sent events
    POST /v1/chat/completions   messages → a reply, through a plain "User: …\\nAssistant:" template
    POST /v1/explain            attention maps and token saliency (JSON) for the playground

Generation is CPU/GPU-bound, so it runs outside the event loop: by default every request joins the
engine's continuous batch (`serve/batching.py`: one scheduler thread decodes all running requests
together), or, with `batching="serial"` (and with a draft), runs in a worker thread behind the model
lock. The event loop stays free to accept requests, answer /health, and notice clients that hang up. Bad
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
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.exceptions import HTTPException

from flashlm.errors import FlashLMError
from flashlm.generation import REPETITION_PENALTY_RANGE, TEMPERATURE_RANGE, Sampling
from flashlm.serve.batching import DEFAULT_MAX_BATCH
from flashlm.serve.completions import (
    MAX_CHOICES,
    MAX_LOGPROBS,
    RequestError,
    complete,
    completion_head,
    read_prompts,
    stream_choices,
)
from flashlm.serve.engine import CHAT_STOP, Engine, Run, chat_prompt
from flashlm.serve.guard import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_BYTES,
    DoorStats,
    Guard,
    Limits,
    allowed_hosts_for,
    check_exposure,
    error_body,
    is_loopback,
    until_disconnected,
)
from flashlm.speculative import DEFAULT_LOOKAHEAD

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
SWITCH_INTERVAL_S = 0.0005  # how often a Python thread in the server offers the GIL to the others
EXPLAIN_MAX_TOKENS = 256  # an explain request's JSON grows with tokens²


# ---- request bodies ----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat. Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # one model per process: any name is answered by it
    temperature: float = Field(
        1.0, ge=0.0, le=TEMPERATURE_RANGE[1], description=f"0 means greedy; else at least {TEMPERATURE_RANGE[0]}"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    # accepted for OpenAI compatibility within OpenAI's range, and not applied (no such penalty here)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):  # between 0 and the floor, logits / temperature overflows to inf
        if 0 < value < TEMPERATURE_RANGE[0]:
            raise ValueError(f"must be 0 (greedy) or at least {TEMPERATURE_RANGE[0]}, got {value}")
        return value

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
        try:
            return self._sampling(max_tokens, extra_stop)
        except ValueError as exc:  # Sampling's own range checks: "field must be ..."
            raise _bad_request(str(exc), str(exc).split(" ", 1)[0]) from None

    def _sampling(self, max_tokens: int, extra_stop: tuple[str, ...]) -> Sampling:
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
    """OpenAI's completions API (`serve/completions.py`): every field it defines is accepted or refused
    with a reason; a field it does not define is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a string, a list of strings, a list of token ids, or a list of token-id lists"
    )
    max_tokens: int = Field(16, ge=0, description="0 with echo: score the prompt only")
    n: int = Field(1, ge=1, le=16, description="choices per prompt (index = prompt_index * n + j)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="log-probabilities of the tokens")
    best_of: int | None = Field(None, ge=1, description="only best_of = n (no server-side ranking)")
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for abuse monitoring: accepted, unused

    # fields are checked in order (the inherited ones, `n` and `stream` among them, first), so `info.data`
    # holds the fields each check depends on, and every refusal names its own field
    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value, info: ValidationInfo):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt (an empty list has none)")
        prompts = len(value) if isinstance(value, list) and isinstance(value[0], (str, list)) else 1
        if prompts > 16:
            raise ValueError("give 1 to 16 prompts")
        if prompts * info.data.get("n", 1) > MAX_CHOICES:
            raise ValueError(f"{prompts} prompts × n={info.data['n']} choices is over the limit of {MAX_CHOICES}")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("stream"):
            raise ValueError("not supported with stream; send stream false to get logprobs")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value, info: ValidationInfo):
        if value is not None and value != info.data.get("n", 1):
            raise ValueError(f"only best_of = n ({info.data.get('n', 1)}) is supported (no server-side ranking)")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        if value:
            raise ValueError("not supported: the model only continues text (no insertion); leave suffix out")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        if value:
            raise ValueError("not supported by this server; leave logit_bias out (or send {})")
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
def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app around a loaded `Engine` (tests pass a tiny model; `serve` loads one from disk),
    behind `guard.Guard` with `limits` (default: 1 MiB bodies, 64 queued requests, no key, any Host).
    /docs and /redoc are off (Swagger UI and ReDoc load from a CDN); /openapi.json stays."""
    app = FastAPI(title="FlashLM", summary="OpenAI-compatible API for a FlashLM model", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.door = DoorStats()
    app.add_middleware(Guard, limits=limits or Limits(), stats=app.state.door)
    cfg = engine.model.cfg
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground() -> str:
        return resources.files("flashlm.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> dict:  # on the event loop: a sync route would queue behind the worker threads
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
    async def completions(req: CompletionRequest, request: Request):
        try:
            prompts = await run_in_threadpool(read_prompts, engine, req.prompt, req.max_tokens)
        except RequestError as exc:
            raise _bad_request(str(exc), exc.param) from None
        sampling = req.sampling(req.max_tokens)
        head = completion_head(engine)

        if req.stream:

            def events(cancel: threading.Event) -> Iterator[dict]:
                runs = []
                for index, piece, finish, run in stream_choices(engine, prompts, sampling, req.n, req.echo, cancel):
                    runs += [run] if run is not None else []
                    choice = {"index": index, "text": piece, "logprobs": None, "finish_reason": finish}
                    yield {**head, "choices": [choice]}
                if req.include_usage:
                    yield {**head, "choices": [], "usage": _usage(runs)}

            return _sse(engine, events)

        body = await until_disconnected(
            request,
            lambda cancel: run_in_threadpool(
                complete, engine, prompts, sampling, req.n, req.echo, req.logprobs, cancel
            ),
            app.state.door,
        )
        return {**head, **body}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        prompt = chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        ids = await run_in_threadpool(_encode_checked, engine, prompt, "messages")
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

        def work(cancel: threading.Event) -> tuple[str, Run]:
            run = Run(len(ids))
            return "".join(engine.pieces(ids, sampling, run, lstrip=True, cancel=cancel)), run

        text, run = await until_disconnected(
            request, lambda cancel: _locked(engine, lambda: work(cancel)), app.state.door
        )
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
            exclusive=True,
        )

    return app


def load_app(
    model_dir: str | Path,
    device: str = "cpu",
    precision: str = "auto",
    draft_dir: str | Path | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    batching: str = "continuous",
    max_batch: int = DEFAULT_MAX_BATCH,
    limits: Limits | None = None,
) -> FastAPI:
    engine = Engine.load(
        model_dir,
        device=device,
        precision=precision,
        draft_dir=draft_dir,
        lookahead=lookahead,
        batching=batching,
        max_batch=max_batch,
    )
    return create_app(engine, limits)


def serve(
    model_dir: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str = "cpu",
    log_level: str = "info",
    precision: str = "auto",
    draft_dir: str | Path | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    batching: str = "continuous",
    max_batch: int = DEFAULT_MAX_BATCH,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_queue: int = DEFAULT_MAX_QUEUE,
    api_key: str | None = None,
    insecure: bool = False,
) -> None:
    """Load the model (and its draft) and serve it with uvicorn until interrupted (loopback only unless
    `host` says so: then an `api_key` is required unless `insecure`). See docs/serving.md for the limits."""
    import sys

    import uvicorn

    check_exposure(host, api_key, insecure)  # before the model loads: a refusal costs nothing
    check_port_free(host, port)
    if not is_loopback(host) and not api_key:
        print(f"warning: listening on {host} with no API key: anyone who can reach it can use it", file=sys.stderr)
    limits = Limits(max_request_bytes, max_queue, api_key, allowed_hosts_for(host))
    app = load_app(model_dir, device, precision, draft_dir, lookahead, batching, max_batch, limits=limits)
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    engine = app.state.engine
    drafted = f" (speculative, draft {engine.draft_name}, lookahead {engine.lookahead})" if engine.draft else ""
    if engine.scheduler is not None:
        drafted = f" (continuous batching, up to {engine.scheduler.max_rows} requests a step)"
    print(f"serving {engine.name}{drafted}: playground at http://{shown}:{port}/, API at /v1", file=sys.stderr)
    # the event loop hands the GIL back at every socket call; at Python's default 5 ms switch interval a busy
    # generation thread would make it wait that long each time to get it back (/health then takes seconds)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def check_port_free(host: str, port: int) -> None:
    """Refuse, in one line before the model loads, a port another process holds or a host that is not
    this machine's (uvicorn would report either in several log lines after loading)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        reason = exc.strerror or exc
        raise FlashLMError(f"--host {host}: cannot resolve it ({reason}); give an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise FlashLMError(
                f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); another server may "
                "hold the port: choose another --port"
            ) from None


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


async def _locked(engine: Engine, fn: Callable, exclusive: bool = False):
    """Run `fn` in a worker thread holding what generation needs (`Engine.generating`: the model lock
    when serial, nothing when batched), or the model lock itself when `exclusive` (waiting there, not
    in the loop)."""

    def locked():
        with engine.lock if exclusive else engine.generating():
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
                with engine.generating():
                    for event in events(cancel):
                        if cancel.is_set():
                            break
                        put(("event", event))
            except Exception as exc:  # noqa: BLE001 - reported to the client as an error event
                put(("error", exc))
            finally:
                put(("end", None))

        worker = threading.Thread(target=work, name="flashlm-generate", daemon=True)
        # Thread.start waits until the new thread runs, milliseconds when the GIL is busy: wait in the loop's
        # executor, not on the event loop, or a burst of streams arriving together stalls it (and /health)
        await loop.run_in_executor(None, worker.start)
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
    return JSONResponse(error_body(message, kind, param), status_code=status)


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

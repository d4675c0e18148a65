"""The server's door: request-size, queue, API-key and Host checks, and stopping work its client left.

`Guard` is one ASGI middleware in front of the whole app. In order, for every HTTP request:

1. Host: when the server listens on loopback, a `Host` header naming any other host is refused (421).
   A web page on another site can point its own domain at 127.0.0.1 (DNS rebinding); the browser then
   sends that domain as `Host`, so this check keeps such pages out of a local server.
2. API key: with a key set, every path but `/` (the playground page) and `/health` needs
   `Authorization: Bearer KEY`, compared in constant time (`hmac.compare_digest`); 401 otherwise.
3. Body size: a `Content-Length` above the cap is refused (413) before a byte of the body is read; a body
   without one (chunked) is counted as it arrives and refused as soon as it passes the cap. The body is
   read here, at most the cap, and handed to the app from memory.
4. Queue: the generation endpoints admit at most `max_queue` requests at a time (running or waiting
   for the model, streams until their last event); beyond that they get 429 with `Retry-After`. It is a
   counter around the app, so it holds whatever the engine does inside.

Refusals are OpenAI-style JSON errors ({"error": {"message", "type", "param", "code"}}), like the app's.
FastAPI's own body limit arrived in 0.165 and the project supports older releases, hence this one.

`until_disconnected` runs a non-streaming generation while watching its client: when the client hangs
up, it sets the cancel event the engine checks at every token, so abandoned requests stop generating.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flashlm.errors import ConfigError

DEFAULT_MAX_REQUEST_BYTES = 2**20  # 1 MiB: far above any prompt that fits a context, far below RAM
DEFAULT_MAX_QUEUE = 64
RETRY_AFTER_S = 1
API_KEY_ENV = "FLASHLM_API_KEY"
OPEN_PATHS = frozenset({"/", "/health"})  # reachable without the API key
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/explain"})
DISCONNECT_POLL_S = 0.1  # how often a running non-streaming request checks that its client is still there

log = logging.getLogger("uvicorn.error")  # the server's own log, so these lines appear with uvicorn's
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """What `Guard` enforces. `allowed_hosts` None accepts any Host header (see `allowed_hosts_for`)."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    api_key: str | None = None
    allowed_hosts: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ConfigError(f"max_request_bytes must be at least 1, got {self.max_request_bytes}")
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty: give a non-empty --api-key (or FLASHLM_API_KEY), or none")


@dataclass
class DoorStats:
    """Counters of the door, kept on `app.state.door` (the event loop is the only writer)."""

    in_flight: int = 0  # generation requests admitted and not yet answered
    rejected: int = 0  # answered 429 because the queue was full
    cancelled: int = 0  # non-streaming generations stopped because their client hung up


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name the server binds) is reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(host: str) -> frozenset[str] | None:
    """The Host header names a server bound to `host` accepts: loopback names when bound to loopback,
    any when bound to other interfaces (their names are the operator's business)."""
    if not is_loopback(host):
        return None
    return frozenset({"localhost", "127.0.0.1", "::1", host.strip("[]").lower()})


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond loopback without an API key, unless the operator says `insecure`."""
    if not is_loopback(host) and not api_key and not insecure:
        raise ConfigError(
            f"--host {host} exposes the model to the network without an API key: give --api-key KEY "
            f"(or set {API_KEY_ENV}), or pass --insecure to serve it open"
        )


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _reply(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    """Send a whole JSON response (without reading the request body: the connection then closes)."""
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def _host_name(header: str) -> str:
    """The host of a Host header: "[::1]:8000" → "::1", "LocalHost:8000" → "localhost"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: ASGIApp, limits: Limits, stats: DoorStats) -> None:
        self.app, self.limits, self.stats = app, limits, stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, body, extra = refusal
            await _reply(send, status, body, {"connection": "close", **extra})
            return
        body = await self._read_body(headers, receive, send)
        if body is None:  # refused (413) or the client left
            return
        generation = scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
        if generation and self.stats.in_flight >= self.limits.max_queue:
            self.stats.rejected += 1
            message = (
                f"the server is busy: {self.stats.in_flight} requests are running or waiting "
                f"(--max-queue {self.limits.max_queue}); retry in {RETRY_AFTER_S} s"
            )
            await _reply(send, 429, error_body(message, "rate_limit_error"), {"retry-after": str(RETRY_AFTER_S)})
            return
        replayed = False

        async def replay() -> Message:  # the body once, from memory, then the client's own messages
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if not generation:
            await self.app(scope, replay, send)
            return
        self.stats.in_flight += 1
        try:
            await self.app(scope, replay, send)
        finally:
            self.stats.in_flight -= 1

    def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, dict, dict[str, str]] | None:
        """(status, body, headers) refusing the request for its Host or credentials, or None."""
        allowed = self.limits.allowed_hosts
        host = headers.get("host")
        if allowed is not None and host is not None and _host_name(host) not in allowed:
            message = (
                f"Host {host!r} is not served here: this server listens on loopback and answers only "
                f"{', '.join(sorted(allowed))} (a page on another site is not let in through DNS rebinding)"
            )
            return 421, error_body(message, "invalid_request_error", "Host"), {}
        key = self.limits.api_key
        if key is None or scope["path"] in OPEN_PATHS:
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
            return None
        message = (
            "invalid API key: send the server's key as 'Authorization: Bearer KEY'"
            if scheme
            else "missing API key: this server needs 'Authorization: Bearer KEY' (the key given to --api-key)"
        )
        return 401, error_body(message, "invalid_request_error", code="invalid_api_key"), {"www-authenticate": "Bearer"}

    async def _read_body(self, headers: Headers, receive: Receive, send: Send) -> bytes | None:
        """The whole request body, or None after answering 413 (never holding more than the cap)."""
        cap = self.limits.max_request_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            await self._too_large(send, f"its Content-Length is {int(declared)} bytes")
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await self._too_large(send, f"it passed {cap} bytes")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send, why: str) -> None:
        cap = self.limits.max_request_bytes
        message = (
            f"request body too large: {why}, and this server accepts at most {cap} bytes "
            "(shorten the prompt, or start the server with a larger --max-request-bytes)"
        )
        await _reply(send, 413, error_body(message, "invalid_request_error"), {"connection": "close"})


async def until_disconnected(
    request: Request, start: Callable[[threading.Event], Awaitable[T]], stats: DoorStats | None = None
) -> T:
    """Await `start(cancel)` (generation in a worker thread) while polling whether the client is still
    connected; if it hangs up, set `cancel` so the generation stops at its next token."""
    cancel = threading.Event()
    task = asyncio.ensure_future(start(cancel))
    try:
        while True:
            if not cancel.is_set() and await request.is_disconnected():
                cancel.set()
                if stats is not None:
                    stats.cancelled += 1
                log.info("client of %s %s hung up: its generation is cancelled", request.method, request.url.path)
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
    finally:
        cancel.set()  # also when this coroutine is itself cancelled (server shutdown)

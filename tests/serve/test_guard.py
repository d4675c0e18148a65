"""The server's door (flashlm/serve/guard.py): body cap, queue limit, API key, Host checks, sampling ranges,
cancelling abandoned generations, no CDN. In-process through TestClient or direct ASGI calls; one small
uvicorn subprocess for what needs a real socket (memory under a 20 MB body, a client that hangs up)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from flashlm.errors import ConfigError
from flashlm.generation import Sampling, next_token_scores, pick, safe_probs
from flashlm.serve import app as serve_app
from flashlm.serve.engine import Engine
from flashlm.serve.guard import (
    DEFAULT_MAX_REQUEST_BYTES,
    Limits,
    allowed_hosts_for,
    check_exposure,
    is_loopback,
)

PROMPT = "Once upon a time, there was a little"
LONG_CONTEXT = 2048  # room for a generation long enough to abandon


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, save_tiny_model):
    """The tiny model with a long context."""
    return save_tiny_model(tmp_path_factory.mktemp("guard") / "tiny", max_seq_len=LONG_CONTEXT)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.load(model_dir)


def app_with(engine, **limits):
    return serve_app.create_app(engine, Limits(**limits))


def error_of(response, status: int) -> dict:
    """The OpenAI-style error of a refused request."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---- the sampler -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 1e-45),
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", 2.5),
        ("repetition_penalty", 1e-300),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("top_k", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("max_new_tokens", -1),
    ],
)
def test_sampling_refuses_values_that_break_the_math(field, value):
    with pytest.raises(ValueError, match=field):
        Sampling(**{field: value})


def test_the_sampler_never_hands_multinomial_nan_or_inf():
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 30
    logits[1, 3] = float("inf")  # a row with +inf scores puts its mass on them
    logits[2] = float("-inf")  # a row with nothing left: falls back to its first token
    logits[3, :10] = float("nan")
    logits[4] = 1e38
    history = torch.tensor([[0, 1, 2]] * 5)
    s = Sampling(temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.5, seed=1)
    # values that bypass Sampling's checks (set after construction) are clamped by the sampler itself
    s.temperature, s.repetition_penalty = 1e-45, 1e-300
    scores = next_token_scores(logits, history, s)
    probs = safe_probs(scores)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(5))
    assert probs[1, 3] == 1.0 and probs[2, 0] == 1.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        tokens = pick(scores, s, generator)
        assert tokens.shape == (5,) and ((tokens >= 0) & (tokens < 50)).all()
        assert tokens[1] == 3 and tokens[2] == 0
    greedy = Sampling(temperature=0)
    assert pick(torch.tensor([[float("nan"), 1.0, 0.0]]), greedy, None).tolist() == [1]


# ---- sampling fields over HTTP -------------------------------------------------------------------------------
BAD_FIELDS = [
    ("temperature", 1e-45),
    ("temperature", -0.5),
    ("temperature", 2.5),
    ("repetition_penalty", 1e-300),
    ("repetition_penalty", 0),
    ("repetition_penalty", 11),
    ("top_p", 0),
    ("top_p", 1.01),
    ("top_k", 0),
    ("presence_penalty", 3),
    ("frequency_penalty", -2.5),
    ("seed", -1),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_out_of_range_sampling_fields_get_400_naming_the_field(engine, field, value):
    client = TestClient(serve_app.create_app(engine))
    for path, body in (
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ):
        error = error_of(client.post(path, json={**body, field: value}), 400)
        assert error["param"] == field and field in error["message"], error


def test_in_range_extremes_are_served(engine):
    client = TestClient(serve_app.create_app(engine))
    for extremes in (
        {"temperature": 0.01, "repetition_penalty": 0.01, "top_k": 10**6, "top_p": 1e-9},
        {"temperature": 2.0, "repetition_penalty": 10.0, "presence_penalty": 2, "seed": 3},
    ):
        response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, **extremes})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1


# ---- body cap --------------------------------------------------------------------------------------------
def test_an_oversized_body_gets_413_before_it_is_read(engine):
    client = TestClient(serve_app.create_app(engine))
    big = json.dumps({"prompt": "x" * DEFAULT_MAX_REQUEST_BYTES}).encode()
    error = error_of(client.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)
    assert str(DEFAULT_MAX_REQUEST_BYTES) in error["message"] and "--max-request-bytes" in error["message"]

    small = app_with(engine, max_request_bytes=200)
    client = TestClient(small)
    body = json.dumps({"prompt": "Once", "max_tokens": 1}).encode()
    assert client.post("/v1/completions", content=body, headers={"content-type": "application/json"}).status_code == 200

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(10):
            yield b" " * 50

    error_of(client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
    error_of(client.post("/v1/explain", content=b"{" + b" " * 300 + b"}"), 413)


# ---- direct ASGI calls: requests that hang or hang up ----------------------------------------------------
def scope_of(path: str, method: str = "POST") -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


class Exchange:
    """One request through the app: its body, then (when `hang_up`) a disconnect; the response collected.
    With `stall`, the first body chunk of the response blocks until `stall` is set (a slow reader)."""

    def __init__(self, body: dict, hang_up: bool = False, stall: asyncio.Event | None = None) -> None:
        self.body, self.hang_up, self.stall = json.dumps(body).encode(), hang_up, stall
        self.sent_body, self.status, self.headers, self.chunks = False, None, {}, []
        self.streaming = asyncio.Event()

    async def receive(self) -> dict:
        if not self.sent_body:
            self.sent_body = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if self.hang_up:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # a client that stays connected
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            if self.stall is not None and message.get("body"):
                self.streaming.set()
                await self.stall.wait()
            self.chunks.append(message.get("body", b""))

    async def run(self, app, path: str) -> Exchange:
        await asyncio.wait_for(app(scope_of(path), self.receive, self.send), timeout=60)
        return self

    def json(self) -> dict:
        return json.loads(b"".join(self.chunks))


def test_a_client_that_hangs_up_cancels_its_non_streaming_generation(engine):
    app = serve_app.create_app(engine)

    async def main():
        gone = await Exchange({"prompt": PROMPT, "max_tokens": 500, "temperature": 0}, hang_up=True).run(
            app, "/v1/completions"
        )
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500, "temperature": 0}
        gone_chat = await Exchange(chat, hang_up=True).run(app, "/v1/chat/completions")
        stays = await Exchange({"prompt": PROMPT, "max_tokens": 5, "temperature": 0}).run(app, "/v1/completions")
        return gone, gone_chat, stays

    gone, gone_chat, stays = asyncio.run(main())
    for exchange in (gone, gone_chat):
        choice = exchange.json()["choices"][0]
        assert choice["finish_reason"] == "cancelled", choice
        assert exchange.json()["usage"]["completion_tokens"] < 500
    assert app.state.door.cancelled == 2
    assert stays.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert stays.json()["usage"]["completion_tokens"] >= 1 and app.state.door.cancelled == 2


def test_a_full_queue_answers_429_with_retry_after(engine):
    app = app_with(engine, max_queue=1)

    async def main():
        stall = asyncio.Event()
        first = Exchange({"prompt": PROMPT, "max_tokens": 20, "stream": True}, stall=stall)
        running = asyncio.ensure_future(first.run(app, "/v1/completions"))
        await asyncio.wait_for(first.streaming.wait(), timeout=60)  # admitted, streaming, reader stalled
        assert app.state.door.in_flight == 1
        second = await Exchange({"prompt": PROMPT, "max_tokens": 2}).run(app, "/v1/completions")
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        third = await Exchange(chat).run(app, "/v1/chat/completions")
        health = Exchange({})
        await asyncio.wait_for(app(scope_of("/health", "GET"), health.receive, health.send), timeout=60)
        stall.set()
        await running
        after = await Exchange({"prompt": PROMPT, "max_tokens": 2}).run(app, "/v1/completions")
        return first, second, third, health, after

    first, second, third, health, after = asyncio.run(main())
    for refused in (second, third):
        assert refused.status == 429 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and "--max-queue 1" in error["message"]
    assert health.status == 200  # the queue limits generation, not the rest
    assert first.status == 200 and b"[DONE]" in b"".join(first.chunks)
    assert after.status == 200 and app.state.door.in_flight == 0 and app.state.door.rejected == 2


# ---- API key and Host ------------------------------------------------------------------------------------
def test_an_api_key_guards_everything_but_the_playground_and_health(engine):
    client = TestClient(app_with(engine, api_key="s3cret"))
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    assert "Authorization: `Bearer ${key}`" in client.get("/").text  # the playground sends the key it asks for
    for path in ("/v1/models", "/openapi.json"):
        error = error_of(client.get(path), 401)
        assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
    assert client.get("/v1/models").headers["www-authenticate"] == "Bearer"
    for wrong in ("Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
        error_of(client.get("/v1/models", headers={"Authorization": wrong}), 401)
    body = {"prompt": PROMPT, "max_tokens": 2}
    error_of(client.post("/v1/completions", json=body), 401)
    key = {"Authorization": "Bearer s3cret"}
    assert client.get("/v1/models", headers=key).status_code == 200
    assert client.post("/v1/completions", json=body, headers=key).status_code == 200


def test_a_loopback_server_refuses_foreign_host_headers(engine):
    app = app_with(engine, allowed_hosts=allowed_hosts_for("127.0.0.1"))
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:8000", "[::1]:8000", "127.0.0.1"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil:8000"):
        for path in ("/", "/health", "/v1/models"):
            error = error_of(client.get(path, headers={"host": host}), 421)
            assert error["param"] == "Host" and "loopback" in error["message"]
    assert allowed_hosts_for("0.0.0.0") is None and allowed_hosts_for("192.168.1.5") is None
    assert "::1" in allowed_hosts_for("::1") and "localhost" in allowed_hosts_for("localhost")
    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "0.0.0.0", "::")] == [
        True,
        True,
        True,
        True,
        True,
        False,
        False,
    ]


def test_an_open_host_needs_a_key_or_insecure(model_dir, monkeypatch, capsys):
    from typer.testing import CliRunner

    from flashlm import cli

    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "k", False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(ConfigError, match="--api-key"):
        check_exposure("0.0.0.0", None, False)
    with pytest.raises(ConfigError, match="max_queue"):
        Limits(max_queue=0)

    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.delenv("FLASHLM_API_KEY", raising=False)
    # the command itself: one line and exit code 2, and no server
    monkeypatch.setattr(sys, "argv", ["flashlm", "serve", str(model_dir), "--host", "0.0.0.0"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "--insecure" in lines[0], lines
    assert calls == []
    assert CliRunner().invoke(cli.app, ["serve", str(model_dir), "--host", "0.0.0.0", "--insecure"]).exit_code == 0
    assert CliRunner().invoke(cli.app, ["serve", str(model_dir), "--host", "0.0.0.0", "--api-key", "k1"]).exit_code == 0
    monkeypatch.setenv("FLASHLM_API_KEY", "k2")
    result = CliRunner().invoke(cli.app, ["serve", str(model_dir), "--host", "0.0.0.0", "--max-queue", "3"])
    assert result.exit_code == 0, result.output
    (open_app, kwargs), (keyed, _), (from_env, _) = calls
    assert kwargs["host"] == "0.0.0.0"
    assert TestClient(open_app, base_url="http://10.0.0.1").get("/v1/models").status_code == 200  # any Host
    assert TestClient(keyed).get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
    assert TestClient(keyed).get("/v1/models").status_code == 401
    assert TestClient(from_env).get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200


# ---- no network in the docs and the playground -------------------------------------------------------------
def test_no_page_loads_anything_from_the_network(engine):
    client = TestClient(serve_app.create_app(engine))
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and "/v1/completions" in schema.json()["paths"]
    page = client.get("/").text
    assert "http://" not in page and "https://" not in page and "//cdn" not in page


# ---- a real server in a subprocess ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(model_dir):
    """`flashlm serve` on a free loopback port; its stderr lines collected in a list."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FLASHLM_API_KEY", None)
    args = [sys.executable, "-m", "flashlm", "serve", str(model_dir), "--port", str(port)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.2)
    yield proc, port, lines
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def raw_post(port: int, head_extra: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head_extra}\r\n".encode())
    return sock


def status_of(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed without a response"
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_a_20_mb_body_gets_413_and_the_server_stays_small(server):
    proc, port, _ = server
    before = rss_bytes(proc.pid)
    size, block = 20 * 2**20, b"x" * 65536
    # declared: refused on its Content-Length alone
    with raw_post(port, f"Content-Type: application/json\r\nContent-Length: {size}\r\n") as sock:
        assert status_of(sock) == 413
    # undeclared (chunked): refused once the first MiB has arrived, long before the 20 MB are sent
    sent = 0
    with raw_post(port, "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n") as sock:
        sock.settimeout(0.05)
        status = None
        while status is None and sent < size:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
            except OSError:  # the server answered and closed
                break
            with contextlib.suppress(TimeoutError):  # no answer yet: keep sending
                status = status_of(sock)
        if status is None:
            sock.settimeout(30)
            status = status_of(sock)
    assert status == 413 and sent < size
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    grown = rss_bytes(proc.pid) - before
    assert grown < 64 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB under a 20 MB body"


def test_a_dropped_client_stops_its_generation(server):
    proc, port, lines = server
    body = json.dumps({"prompt": PROMPT, "max_tokens": LONG_CONTEXT, "temperature": 0})
    with raw_post(port, f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n") as sock:
        sock.sendall(body.encode())
        time.sleep(0.3)
    deadline = time.monotonic() + 30
    while not any("hung up" in line for line in lines):
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    assert any("cancelled" in line for line in lines)
    short = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Once", "max_tokens": 4}, timeout=30
    ).json()
    assert short["usage"]["completion_tokens"] >= 1

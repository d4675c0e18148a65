"""The OpenAI-compatible server, the chat template and REPL, and the serve/chat CLI verbs (tiny model, CPU)."""

from __future__ import annotations

import inspect
import json
import sys
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from flashlm import cli
from flashlm.config import get_preset, replace
from flashlm.generation import Sampling, generate
from flashlm.model.transformer import FlashLM
from flashlm.serve import app as serve_app
from flashlm.serve.engine import Engine, Run, chat_prompt, chat_repl
from flashlm.tokenizer import Tokenizer

PROMPT = "Once upon a time, there was a little"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, save_tiny_model):
    return save_tiny_model(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.load(model_dir)


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(serve_app.create_app(engine))


def sse(response) -> list[dict]:
    """The JSON events of a server-sent-event body, checking the framing and the closing [DONE]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(block[len("data: ") :]) for block in events[:-1]]


def completion(client, **body) -> dict:
    response = client.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()


def streamed_completion(client, **body) -> tuple[str, list[dict]]:
    events = sse(client.post("/v1/completions", json={"prompt": PROMPT, "stream": True, **body}))
    return "".join(c["text"] for e in events for c in e["choices"]), events


# ---- basics ----------------------------------------------------------------------------------------
def test_health_models_and_playground(client, engine):
    assert client.get("/health").json() == {"status": "ok", "model": engine.name}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == engine.name
    assert models["data"][0]["context_length"] == engine.context
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for needle in ("/v1/completions", "/v1/chat/completions", "/v1/explain", "getReader", "<canvas"):
        assert needle in html
    assert "<script src" not in html and "<link" not in html and "https://" not in html  # no network


def test_completion_matches_the_library_and_counts_tokens(client, engine):
    body = completion(client, max_tokens=12, temperature=0)
    choice = body["choices"][0]
    expected = generate(engine.model, engine.tokenizer, PROMPT, Sampling(max_new_tokens=12, temperature=0))
    assert choice["text"] == expected
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(engine.tokenizer.encode(PROMPT, add_bos=True))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 12
    else:
        assert choice["finish_reason"] == "stop" and usage["completion_tokens"] <= 12


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=7)])
def test_streamed_chunks_join_to_the_plain_completion(client, sampling):
    plain = completion(client, max_tokens=20, **sampling)
    text, events = streamed_completion(client, max_tokens=20, stream_options={"include_usage": True}, **sampling)
    assert text == plain["choices"][0]["text"]
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finishes == [plain["choices"][0]["finish_reason"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]


def test_seeds_reproduce_and_differ(client):
    a, b, c = (completion(client, max_tokens=20, temperature=1.0, seed=s)["choices"][0]["text"] for s in (1, 1, 2))
    assert a == b and a != c


def test_a_list_of_prompts_gets_one_choice_each(client):
    body = client.post(
        "/v1/completions", json={"prompt": [PROMPT, "The dog"], "max_tokens": 5, "temperature": 0}
    ).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == completion(client, max_tokens=5, temperature=0)["choices"][0]["text"]


# ---- stop strings ------------------------------------------------------------------------------------
def test_stop_strings_cut_the_text_streamed_or_not(client):
    full = completion(client, max_tokens=30, temperature=0)["choices"][0]["text"]
    assert len(full) >= 12, full
    for stop in (full[6:9], full[4:12]):  # the longer one spans several tokens
        expected = full[: full.find(stop)]
        body = completion(client, max_tokens=30, temperature=0, stop=[stop, "never appears"])
        assert body["choices"][0]["text"] == expected
        assert body["choices"][0]["finish_reason"] == "stop"
        text, events = streamed_completion(client, max_tokens=30, temperature=0, stop=stop)
        assert text == expected  # held back, never streamed past the stop
        assert events[-1]["choices"][0]["finish_reason"] == "stop"


# ---- chat --------------------------------------------------------------------------------------------
def test_chat_template():
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "A story?"},
    ]
    assert chat_prompt(messages) == "System: Be kind.\nUser: Hi\nAssistant: Hello.\nUser: A story?\nAssistant:"


def test_chat_completion_streamed_and_not(client, engine):
    messages = [{"role": "user", "content": "Tell me a story."}]
    body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0}).json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and "\nUser:" not in message["content"]
    assert message["content"] == message["content"].lstrip()
    prompt = "User: Tell me a story.\nAssistant:"
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(prompt, add_bos=True))

    events = sse(
        client.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0, "stream": True}
        )
    )
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == message["content"]
    assert events[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


def test_a_chat_reply_honours_stop_strings_after_stripping(engine):
    """Stop strings match the generated text; the reply is what precedes them, less leading whitespace."""
    ids = engine.encode("User: hi\nAssistant:")
    raw = "".join(engine.pieces(ids, Sampling(max_new_tokens=30, temperature=0), Run(len(ids))))
    for stop in (raw[5:10], raw[0:4]):
        run = Run(len(ids))
        sampling = Sampling(max_new_tokens=30, temperature=0, stop=(stop,))
        reply = "".join(engine.pieces(ids, sampling, run, lstrip=True))
        assert reply == raw[: raw.find(stop)].lstrip() and run.finish_reason == "stop"


def test_chat_repl_reads_lines_until_eof(engine):
    written: list[str] = []
    history = chat_repl(
        engine,
        Sampling(max_new_tokens=6, temperature=0),
        ["hello", "", "/reset", "again"],
        written.append,
        system="Be brief.",
    )
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "again"
    assert "(conversation cleared)\n" in written
    replies = "".join(written).split("(conversation cleared)\n")
    assert len(replies) == 2 and all(r.endswith("\n") for r in replies)


def test_chat_cli_exits_on_eof(model_dir):
    result = CliRunner().invoke(
        cli.app, ["chat", str(model_dir), "--max-new-tokens", "4", "--temperature", "0"], input="hi\nhow are you?\n"
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("\n") >= 2


# ---- bad requests --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": 5}, "temperature"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": "once " * 400}, "prompt"),  # longer than the context
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ("/v1/explain", {"text": "hi", "layer": 99}, "layer"),
        ("/v1/explain", {"text": ""}, "text"),
    ],
)
def test_bad_requests_get_a_clear_400(client, url, body, param):
    response = client.post(url, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(param) and param in error["message"]
    assert "Traceback" not in response.text


def test_malformed_json_is_a_400(client):
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


# ---- explain endpoint ----------------------------------------------------------------------------------
def test_explain_endpoint(client, engine):
    body = client.post("/v1/explain", json={"text": PROMPT, "layer": 1, "head": 0}).json()
    n = len(body["tokens"])
    assert n == len(engine.tokenizer.encode(PROMPT, add_bos=True)) and body["tokens"][0] == "<bos>"
    assert (body["n_layers"], body["n_heads"]) == (engine.model.cfg.n_layers, engine.model.cfg.n_heads)
    attention = torch.tensor(body["attention"])
    assert attention.shape == (n, n)
    assert torch.allclose(attention.sum(-1), torch.ones(n), atol=1e-3)
    assert len(body["saliency"]["scores"]) == n


# ---- serving ---------------------------------------------------------------------------------------
def test_the_event_loop_stays_free_while_the_model_is_busy(engine):
    """A completion waiting for the model (here: the lock held by the test) must not block /health."""
    results: dict[str, object] = {}

    def request(name, method, url, **kwargs):
        results[name] = getattr(client, method)(url, **kwargs)

    with TestClient(serve_app.create_app(engine)) as client:  # one event loop for all requests
        with engine.lock:
            busy = threading.Thread(
                target=request,
                args=("completion", "post", "/v1/completions"),
                kwargs={"json": {"prompt": "Once", "max_tokens": 3, "temperature": 0}},
            )
            busy.start()
            busy.join(timeout=0.5)
            health = threading.Thread(target=request, args=("health", "get", "/health"))
            health.start()
            health.join(timeout=20)
            assert not health.is_alive() and results["health"].status_code == 200
            assert busy.is_alive()  # still waiting for the model
        busy.join(timeout=60)
    assert results["completion"].status_code == 200


def test_a_cancelled_generation_stops(engine):
    ids = engine.encode(PROMPT)
    cancel, run = threading.Event(), Run(len(ids))
    pieces = engine.pieces(ids, Sampling(max_new_tokens=50, temperature=0), run, cancel=cancel)
    next(pieces)
    cancel.set()
    assert list(pieces) == [] and run.finish_reason == "cancelled" and run.completion_tokens < 50


def test_default_host_is_loopback(model_dir, monkeypatch):
    assert inspect.signature(cli.serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve_app.serve).parameters["host"].default == "127.0.0.1"
    calls = []
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    result = CliRunner().invoke(cli.app, ["serve", str(model_dir)])
    assert result.exit_code == 0, result.output
    ((app, kwargs),) = calls
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8000
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/health").json()["status"] == "ok"


# ---- speculative decoding with a draft model ------------------------------------------------------------
@pytest.fixture(scope="module")
def draft_dir(model_dir, tmp_path_factory):
    """Another nano model (other random weights, two local layers) with the target's tokenizer."""
    torch.manual_seed(1)
    draft = FlashLM(replace(get_preset("nano"), layer_pattern="LG", sliding_window=8)).eval()
    with torch.no_grad():
        draft.embed.weight.mul_(4.0)
    return draft.save_pretrained(tmp_path_factory.mktemp("serve") / "draft", tokenizer=Tokenizer.load(model_dir))


def test_a_served_draft_gives_the_targets_text_streamed_or_not(model_dir, draft_dir, engine, client):
    drafted = TestClient(serve_app.create_app(Engine.load(model_dir, draft_dir=draft_dir, lookahead=3)))
    assert drafted.get("/health").json() == {"status": "ok", "model": engine.name, "draft": "draft"}
    assert drafted.get("/v1/models").json()["data"][0]["draft"] == {"id": "draft", "n_layers": 2, "lookahead": 3}
    assert "draft" not in client.get("/health").json()
    greedy = dict(max_tokens=40, temperature=0)
    plain = completion(client, **greedy)
    fast = completion(drafted, **greedy)
    assert fast["choices"] == plain["choices"] and fast["usage"] == plain["usage"]
    assert streamed_completion(drafted, **greedy)[0] == plain["choices"][0]["text"]
    sampled = dict(max_tokens=30, temperature=1.0, top_p=0.9, seed=5)
    assert streamed_completion(drafted, **sampled)[0] == completion(drafted, **sampled)["choices"][0]["text"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0}
    reply = drafted.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert reply == client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def test_generate_and_serve_cli_take_a_draft(model_dir, draft_dir, monkeypatch):
    args = ["generate", str(model_dir), "-p", PROMPT, "--temperature", "0", "--max-new-tokens", "15"]
    plain = CliRunner().invoke(cli.app, args)
    fast = CliRunner().invoke(cli.app, [*args, "--draft", str(draft_dir), "--lookahead", "2"])
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.output
    assert fast.output == plain.output
    both = [*args, "-p", "The dog"]
    assert (
        CliRunner().invoke(cli.app, [*both, "--draft", str(draft_dir)]).output
        == CliRunner().invoke(cli.app, both).output
    )
    calls = []
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(app))
    result = CliRunner().invoke(cli.app, ["serve", str(model_dir), "--draft", str(draft_dir)])
    assert result.exit_code == 0, result.output
    assert TestClient(calls[0], base_url="http://127.0.0.1:8000").get("/health").json()["draft"] == "draft"


def test_a_draft_with_another_tokenizer_is_one_clear_error(model_dir, tmp_path, monkeypatch, capsys):
    other = Tokenizer.train(iter(["completely different words", "and other ones"] * 50), 512, show_progress=False)
    FlashLM(get_preset("nano")).save_pretrained(tmp_path / "other", other)
    for draft, needle in ((tmp_path / "other", "tokenizer"), (tmp_path / "missing", "no such model directory")):
        monkeypatch.setattr(sys, "argv", ["flashlm", "generate", str(model_dir), "-p", "x", "--draft", str(draft)])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        output = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(output.splitlines()) == 1 and needle in output, output

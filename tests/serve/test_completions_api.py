"""/v1/completions as OpenAI's completions API defines it: echo, logprobs, token-id prompts, n, seed, stop,
and refusals that name the field (tiny model, CPU, in-process)."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from flashlm.evaluate.lm import perplexity
from flashlm.serve import app as serve_app
from flashlm.serve.engine import Engine

PROMPT = "Once upon a time, there was a little"


@pytest.fixture(scope="module")
def engine(tmp_path_factory, save_tiny_model):
    engine = Engine.load(save_tiny_model(tmp_path_factory.mktemp("cmpl") / "tiny"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(serve_app.create_app(engine))


def post(client, **body) -> dict:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def refused(client, **body) -> dict:
    response = client.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert response.status_code == 400, response.text
    return response.json()["error"]


@torch.no_grad()
def model_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """log p(· | ids[:i]) for every position i, straight from the model: [len(ids), V]."""
    return engine.model(torch.tensor([ids]), mode="causal").logits.float()[0].log_softmax(-1)


# ---- scoring: echo + logprobs -----------------------------------------------------------------------
def test_echo_scores_a_string_prompt_as_flashlm_eval(client, engine):
    """max_tokens 0 + echo: the prompt only, after the <bos> the server puts first (logprob None), and the
    sum of its token logprobs is flashlm.evaluate.lm's log-likelihood of the text."""
    body = post(client, prompt=PROMPT, echo=True, max_tokens=0, logprobs=2)
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and choice["index"] == 0
    lp = choice["logprobs"]
    ids = engine.tokenizer.encode(PROMPT, add_bos=True)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert lp["tokens"][0] == "<bos>" and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"][1:]) == PROMPT
    assert lp["text_offset"] == [0] + [sum(len(t) for t in lp["tokens"][1:i]) for i in range(1, len(ids))]
    reference = perplexity(engine.model, engine.tokenizer, [PROMPT], add_eos=False)
    assert sum(lp["token_logprobs"][1:]) == pytest.approx(-reference["nats"], abs=1e-4)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_top_logprobs_are_the_models_likeliest_tokens(client, engine):
    ids = engine.tokenizer.encode(PROMPT, add_bos=True)
    lp = post(client, prompt=[ids], echo=True, max_tokens=0, logprobs=3)["choices"][0]["logprobs"]
    reference = model_logprobs(engine, ids)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(reference[i - 1, ids[i]].item(), abs=1e-4)
        best = reference[i - 1].topk(3).values.tolist()
        assert sorted(lp["top_logprobs"][i].values(), reverse=True) == pytest.approx(best[: len(lp["top_logprobs"][i])])
        assert max(lp["top_logprobs"][i].values()) >= lp["token_logprobs"][i] - 1e-6


def test_token_id_prompts_are_used_verbatim(client, engine):
    """A list of ids is one prompt, a list of id lists several; no <bos> is added; echo decodes them."""
    first = engine.tokenizer.encode("The cat sat")
    second = engine.tokenizer.encode(PROMPT, add_bos=True)
    one = post(client, prompt=first, echo=True, max_tokens=0, logprobs=0)["choices"]
    assert len(one) == 1 and one[0]["text"] == "The cat sat"
    assert len(one[0]["logprobs"]["tokens"]) == len(first) and one[0]["logprobs"]["token_logprobs"][0] is None
    assert all(top == {} for top in one[0]["logprobs"]["top_logprobs"][1:])  # logprobs 0: none of the top
    many = post(client, prompt=[first, second], echo=True, max_tokens=0, logprobs=1)["choices"]
    assert [c["index"] for c in many] == [0, 1]
    assert [len(c["logprobs"]["tokens"]) for c in many] == [len(first), len(second)]
    assert many[1]["text"] == PROMPT
    # the same ids alone or in a list score the same
    assert many[0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        one[0]["logprobs"]["token_logprobs"][1:], abs=1e-5
    )


def test_lm_eval_style_request(client, engine):
    """lm-eval's loglikelihood request: token ids, echo, max_tokens 1, logprobs 1, temperature 0. The
    tokens are the prompt plus exactly one generated token; `[ctxlen:-1]` are the continuation's."""
    ids = engine.tokenizer.encode(PROMPT, add_bos=True)
    body = post(client, prompt=[ids], echo=True, max_tokens=1, logprobs=1, temperature=0, seed=1234)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    greedy = int(model_logprobs(engine, ids)[-1].argmax())
    assert lp["token_logprobs"][-1] == pytest.approx(model_logprobs(engine, ids)[-1, greedy].item(), abs=1e-4)
    assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()), abs=1e-6)


# ---- generation: logprobs of the completion, stop, n and seed --------------------------------------
def test_completion_logprobs_cover_the_generated_text(client):
    body = post(client, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == body["usage"]["completion_tokens"]
    assert lp["text_offset"][0] == len(PROMPT)  # offsets count into prompt + completion (OpenAI's way)
    for token, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert token == pytest.approx(max(top.values()), abs=1e-6)  # greedy: each token is the likeliest


def test_stop_cuts_text_and_logprobs(client):
    full = post(client, prompt=PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
    cut = next(k for k in range(1, len(full)) if full.index(full[k]) == k and full[k].strip())
    stop = full[cut]  # first seen at `cut`, past the start of the text (maybe inside a token)
    choice = post(client, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], logprobs=0)["choices"][0]
    assert choice["text"] == full[:cut] and choice["finish_reason"] == "stop"
    joined = "".join(choice["logprobs"]["tokens"])
    assert joined.startswith(choice["text"]) and len(joined) - len(choice["logprobs"]["tokens"][-1]) < len(
        choice["text"]
    )


def test_n_choices_with_a_seed_are_reproducible(client):
    """n choices per prompt, indexed prompt_index * n + j; choice j samples with seed + j."""
    body = {"prompt": [PROMPT, "The cat"], "max_tokens": 8, "n": 3, "seed": 11, "temperature": 1.0}
    first = post(client, **body)["choices"]
    assert [c["index"] for c in first] == list(range(6))
    assert first == post(client, **body)["choices"]  # the same request, the same texts
    assert len({c["text"] for c in first[:3]}) > 1  # the n choices differ
    alone = post(client, prompt="The cat", max_tokens=8, n=1, seed=12, temperature=1.0)["choices"][0]
    assert alone["text"] == first[4]["text"]  # prompt 1, choice 1: seed 11 + 1


def test_streamed_echo_and_n(client):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "n": 2, "echo": True}
    plain = post(client, **body)["choices"]
    plain_usage = post(client, **body)["usage"]
    stream_options = {"include_usage": True}
    response = client.post("/v1/completions", json={**body, "stream": True, "stream_options": stream_options})
    assert response.status_code == 200
    events = [json.loads(b[len("data: ") :]) for b in response.text.split("\n\n") if b and b != "data: [DONE]"]
    assert events[-1]["usage"] == plain_usage  # the prompt counted once, the completions of both choices
    texts = {0: "", 1: ""}
    for event in events:
        for c in event["choices"]:
            texts[c["index"]] += c["text"]
    assert texts == {0: plain[0]["text"], 1: plain[1]["text"]} and plain[0]["text"].startswith(PROMPT)


# ---- what is refused, and what is accepted ---------------------------------------------------------
def test_unknown_and_unsupported_fields_are_refused_by_name(client, engine):
    error = refused(client, frobnicate=1)
    assert error["param"] == "frobnicate" and "frobnicate" in error["message"]
    assert refused(client, suffix="The end.")["param"] == "suffix"
    assert refused(client, best_of=3)["param"] == "best_of"
    assert refused(client, logit_bias={"5": 10})["param"] == "logit_bias"
    assert refused(client, logprobs=6)["param"] == "logprobs"
    assert refused(client, logprobs=1, stream=True)["param"] == "logprobs"
    assert refused(client, prompt=[])["param"] == "prompt"
    assert refused(client, n=17)["param"] == "n"
    error = refused(client, prompt=[3, 4, engine.model.cfg.vocab_size])
    assert error["param"] == "prompt" and str(engine.model.cfg.vocab_size) in error["message"]
    long = [5] * engine.context
    assert "context" in refused(client, prompt=[long], max_tokens=1)["message"]
    assert refused(client, prompt=[long + [5]], max_tokens=0)["param"] == "prompt"


def test_common_openai_fields_are_accepted(client, engine):
    body = post(
        client,
        prompt=PROMPT,
        max_tokens=2,
        user="someone",
        best_of=1,
        logit_bias={},
        suffix=None,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        stream_options=None,
    )
    assert len(body["choices"]) == 1
    full = [5] * engine.context  # the whole context scored: nothing left to generate, nothing needed
    lp = post(client, prompt=[full], max_tokens=0, echo=True, logprobs=0)["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == engine.context


def test_a_completion_ended_by_eos_reports_the_eos_token(client, engine):
    """lm-eval reads `token_logprobs[ctxlen:-1]`: the last token must be the generated one even when it is
    <eos> (whose text is ""), so the eos is reported. Sampled from the prompt where <eos> is likeliest."""
    tok = engine.tokenizer
    with torch.no_grad():
        rows = torch.tensor([[tok.bos_id, t] for t in range(engine.model.cfg.vocab_size)])
        logits = engine.model(rows, mode="causal").logits[:, -1].float()
    prompt = rows[int((logits[:, tok.eos_id] - logits.max(-1).values).argmax())].tolist()
    body = {"prompt": [prompt], "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 1.5, "n": 16}
    ended = [c for seed in range(0, 160, 16) for c in post(client, **body, seed=seed)["choices"]]
    ended = [c for c in ended if c["finish_reason"] == "stop"]
    assert ended, "no sampled choice ended at <eos>"
    lp = ended[0]["logprobs"]
    assert lp["tokens"][-1] == "<eos>" and len(lp["tokens"]) == len(prompt) + 1
    expected = logits.log_softmax(-1)[prompt[1], tok.eos_id].item()
    assert lp["token_logprobs"][-1] == pytest.approx(expected, abs=1e-4)
    assert ended[0]["text"] == tok.decode(prompt)  # the echo; <eos> adds no text


def test_the_documented_requests(client, engine):
    """docs/elsewhere.md's curl bodies, sent as written: they are answered as the page says."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "elsewhere.md"
    block = page.read_text().split("<!-- completions:begin -->")[1].split("<!-- completions:end -->")[0]
    bodies = [json.loads(b) for b in re.findall(r"-d '(\{.*\})'", block)]
    assert len(bodies) == 3
    scored, lm_eval_style, sampled = (post(client, **b) for b in bodies)
    assert scored["choices"][0]["logprobs"]["tokens"][0] == "<bos>"
    assert all(len(top) == 2 for top in scored["choices"][0]["logprobs"]["top_logprobs"][1:])
    assert len(lm_eval_style["choices"][0]["logprobs"]["tokens"]) == len(bodies[1]["prompt"][0]) + 1
    assert [c["index"] for c in sampled["choices"]] == list(range(6))
    assert sampled == {**post(client, **bodies[2]), "id": sampled["id"], "created": sampled["created"]}

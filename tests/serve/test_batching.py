"""Continuous batching (`flashlm.serve.batching`): rows decode as they would alone, keep their own
settings, stop and leave on their own, and a server under 200 concurrent streams stays responsive."""

from __future__ import annotations

import json
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from flashlm import cli
from flashlm.config import get_preset, replace
from flashlm.generation import Sampling, generate_tokens
from flashlm.model.transformer import FlashLM
from flashlm.serve.batching import _END, Scheduler, Ticket
from flashlm.serve.engine import Engine, Run


def tiny(flavour: str = "gemma", seed: int = 0, max_seq_len: int = 64) -> FlashLM:
    """Three layers, two of them local with a window of 6, sharpened so greedy paths are not ties."""
    torch.manual_seed(seed)
    cfg = replace(
        get_preset("nano"),
        flavour=flavour,
        layer_pattern="LLG",
        n_layers=3,
        sliding_window=6,
        max_seq_len=max_seq_len,
    )
    model = FlashLM(cfg).eval()
    with torch.no_grad():
        model.embed.weight.mul_(4.0)
    return model


def alone(model: FlashLM, ids: list[int], sampling: Sampling, eos_id: int | None = None) -> list[int]:
    return [step[0] for step in generate_tokens(model, [ids], sampling, eos_id=eos_id)]


def drain(ticket: Ticket) -> list[int]:
    """Tokens already in a ticket's queue (the scheduler runs in the test's thread: nothing more comes)."""
    tokens = []
    while True:
        try:
            item = ticket.out.get_nowait()
        except queue.Empty:
            return tokens
        if item is _END:
            return tokens
        tokens.append(item)


def run_plan(scheduler: Scheduler, plan: list[tuple[int, list[int], Sampling]]) -> list[list[int]]:
    """Submit each (arrival step, prompt, sampling) at its step; step until every request is done."""
    tickets: dict[int, Ticket] = {}
    for step in range(1000):
        for i, (arrival, ids, sampling) in enumerate(plan):
            if arrival == step:
                tickets[i] = scheduler.submit(ids, sampling)
        scheduler.step()
        if len(tickets) == len(plan) and not scheduler.rows and not scheduler.waiting:
            break
    return [drain(tickets[i]) for i in range(len(plan))]


def prompt(rng: random.Random, length: int) -> list[int]:
    return [1] + [rng.randrange(5, 512) for _ in range(length - 1)]


# ---- the batch -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", ["gemma", "llama"])
def test_greedy_rows_equal_the_request_alone_whatever_joins_or_leaves(flavour):
    """Prompts of 1 to 45 tokens arriving at different steps, some with a repetition penalty, past the
    sliding window and up to the whole context (the batch moves left and right in the cache)."""
    model = tiny(flavour)
    rng = random.Random(0)
    arrivals = [(0, 5, 20), (0, 12, 30), (2, 3, 40), (3, 30, 20), (6, 1, 50), (9, 45, 10), (15, 7, 45), (20, 2, 62)]
    plan = [
        (step, prompt(rng, length), Sampling(max_new_tokens=n, temperature=0, repetition_penalty=1.3 if i % 2 else 1))
        for i, (step, length, n) in enumerate(arrivals)
    ]
    scheduler = Scheduler(model, eos_id=None, max_batch=6, thread=False)
    batched = run_plan(scheduler, plan)
    assert scheduler.peak_rows == 6  # the batch was full (and requests waited for a row)
    for (_, ids, sampling), tokens in zip(plan, batched, strict=True):
        expected = alone(model, ids, sampling)
        assert len(expected) == min(sampling.max_new_tokens, 64 - len(ids))
        assert tokens == expected


def test_each_row_keeps_its_own_sampling_settings():
    model = tiny(seed=1)
    rng = random.Random(1)
    settings = [
        Sampling(max_new_tokens=25, temperature=0.8, top_k=40, top_p=0.9, seed=3),
        Sampling(max_new_tokens=25, temperature=1.0, seed=4),
        Sampling(max_new_tokens=7, temperature=0),
        Sampling(max_new_tokens=25, temperature=1.2, top_p=0.8, repetition_penalty=1.5, seed=5),
        Sampling(max_new_tokens=25, temperature=0.8, top_k=40, top_p=0.9, seed=3),  # as the first one
    ]
    plan = [(i, prompt(rng, 4 + 3 * i), s) for i, s in enumerate(settings)]
    plan[4] = (4, plan[0][1], settings[4])
    batched = run_plan(Scheduler(model, eos_id=None, thread=False), plan)
    for (_, ids, sampling), tokens in zip(plan, batched, strict=True):
        assert tokens == alone(model, ids, sampling)
    assert len(batched[2]) == 7 and batched[4] == batched[0] and batched[0] != batched[1]


def test_eos_ends_only_its_own_row():
    model = tiny(seed=2)
    rng = random.Random(2)
    a, b = prompt(rng, 6), prompt(rng, 9)
    greedy = Sampling(max_new_tokens=30, temperature=0)
    path_a, path_b = alone(model, a, greedy), alone(model, b, greedy)
    eos = next(t for t in path_a[2:] if t not in path_b)  # a token row a produces and row b never does
    keep_going = Sampling(max_new_tokens=30, temperature=0, stop_at_eos=False)
    plan = [(0, a, greedy), (0, b, greedy), (1, a, keep_going)]
    batched = run_plan(Scheduler(model, eos_id=eos, thread=False), plan)
    assert batched[0] == path_a[: path_a.index(eos) + 1]  # ends with its <eos>
    assert batched[1] == path_b and batched[2] == path_a  # untouched / eos ignored on request


def test_a_closed_row_is_retired_at_the_next_step_and_the_others_go_on():
    model = tiny(seed=3)
    rng = random.Random(3)
    a, b = prompt(rng, 5), prompt(rng, 8)
    greedy = Sampling(max_new_tokens=40, temperature=0)
    scheduler = Scheduler(model, eos_id=None, thread=False)
    first, second = scheduler.submit(a, greedy), scheduler.submit(b, greedy)
    scheduler.step()
    scheduler.step()
    assert scheduler.running == 2
    first.close()
    scheduler.step()
    assert scheduler.rows == [second]
    while scheduler.rows:
        scheduler.step()
    assert drain(second) == alone(model, b, greedy)
    assert 0 < len(drain(first)) < 40


def test_the_scheduler_thread_streams_to_concurrent_callers_and_stops_on_cancel():
    model = tiny(seed=4)
    scheduler = Scheduler(model, eos_id=None)
    rng = random.Random(4)
    prompts = [prompt(rng, 3 + i) for i in range(8)]
    greedy = Sampling(max_new_tokens=20, temperature=0)
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        results[i] = [step[0] for step in scheduler.submit(prompts[i], greedy).steps()]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(results[i] == alone(model, prompts[i], greedy) for i in range(8))
    cancel = threading.Event()
    steps = scheduler.submit(prompts[0], Sampling(max_new_tokens=60, temperature=0)).steps(cancel)
    next(steps)
    cancel.set()
    rest = list(steps)
    deadline = time.monotonic() + 10
    while scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.running == 0 and len(rest) < 59
    scheduler.close()


def test_the_kv_budget_caps_the_rows_and_the_rest_wait():
    model = tiny(seed=5)
    rng = random.Random(5)
    probe = Scheduler(model, eos_id=None, thread=False)
    scheduler = Scheduler(model, eos_id=None, kv_budget_bytes=int(2.5 * probe.row_bytes), thread=False)
    assert scheduler.max_rows == 2
    greedy = Sampling(max_new_tokens=12, temperature=0)
    plan = [(0, prompt(rng, 4 + i), greedy) for i in range(4)]
    batched = run_plan(scheduler, plan)
    assert scheduler.peak_rows == 2
    assert batched == [alone(model, ids, greedy) for _, ids, _ in plan]


def test_a_failing_step_reaches_its_callers_and_the_scheduler_goes_on(monkeypatch):
    model = tiny(seed=6)
    scheduler = Scheduler(model, eos_id=None)
    greedy = Sampling(max_new_tokens=5, temperature=0)

    def broken() -> None:
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(scheduler, "_decode", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(scheduler.submit([1, 7, 9], greedy).steps())
    monkeypatch.undo()
    assert [step[0] for step in scheduler.submit([1, 7, 9], greedy).steps()] == alone(model, [1, 7, 9], greedy)
    scheduler.close()


# ---- the engine and the server --------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, save_tiny_model):
    return save_tiny_model(tmp_path_factory.mktemp("batching") / "tiny")


def test_concurrent_requests_get_the_serial_texts_with_their_own_stop_strings(model_dir):
    serial = Engine.load(model_dir, batching="serial")
    batched = Engine.load(model_dir)
    assert batched.batching == "continuous" and serial.scheduler is None
    starts = ["Once upon a time", "The dog", "Tom and Lily went to the", "She said", "A little bird"]
    requests = []
    for i, start in enumerate(starts):
        ids = serial.encode(start)
        with serial.generating():
            full = "".join(serial.pieces(ids, Sampling(max_new_tokens=30, temperature=0), Run(len(ids))))
        stop = (full[len(full) // 2 : len(full) // 2 + 3],) if i % 2 else ()  # every other one stops midway
        seed = dict(temperature=0.9, top_p=0.9, seed=i) if i == 4 else dict(temperature=0)
        requests.append((ids, Sampling(max_new_tokens=30, stop=stop, **seed)))

    def complete(engine: Engine, ids, sampling) -> tuple[str, str | None, int]:
        run = Run(len(ids))
        with engine.generating():
            text = "".join(engine.pieces(ids, sampling, run))
        return text, run.finish_reason, run.completion_tokens

    expected = [complete(serial, *r) for r in requests]
    got: dict[int, tuple] = {}
    threads = [
        threading.Thread(target=lambda i=i: got.__setitem__(i, complete(batched, *requests[i])))
        for i in range(len(requests))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [got[i] for i in range(len(requests))] == expected
    assert {finish for _, finish, _ in expected} == {"stop", "length"}
    batched.close()


def test_a_bad_batching_mode_is_one_line(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["flashlm", "serve", str(model_dir), "--batching", "parallel"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    output = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(output.splitlines()) == 1 and "--batching" in output, output


# 200 concurrent streaming completions against the server at argv[1]; prints [status, finish_reason, [DONE]] each
STREAMS_200 = """
import asyncio, json, sys
import httpx

async def stream(client, i):
    body = {"prompt": f"Story {i}: once", "max_tokens": 4, "temperature": 0.8, "seed": i, "stream": True}
    finish, done = None, False
    async with client.stream("POST", sys.argv[1] + "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: ") and "choices" in line:
                finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
    return response.status_code, finish, done

async def main():
    limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        print(json.dumps(await asyncio.gather(*(stream(client, i) for i in range(200)))))

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_200_concurrent_streams_all_finish_while_health_answers_fast(model_dir):
    """The fault test of issue 26, on `flashlm serve` in a subprocess: every stream ends with a
    finish_reason and [DONE], and /health answers in under 0.5 s throughout."""
    port = free_port()
    command = [sys.executable, "-m", "flashlm", "serve", str(model_dir), "--port", str(port), "--max-queue", "256"]
    # one torch thread: the test's client shares the CPUs, and OpenMP threads spin-waiting on a busy machine
    # would measure the machine's load, not the server's event loop
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    assert server.poll() is None, server.stderr.read()

    client = subprocess.Popen([sys.executable, "-c", STREAMS_200, base], stdout=subprocess.PIPE, text=True)
    waits = []
    try:
        with httpx.Client(timeout=10) as health:
            while client.poll() is None:  # /health from this process while the client's streams run
                start = time.perf_counter()
                assert health.get(f"{base}/health").status_code == 200
                waits.append(time.perf_counter() - start)
                time.sleep(0.05)
        results = json.loads(client.stdout.read())
    finally:
        client.kill()
        server.terminate()
        server.wait(timeout=20)
    assert len(results) == 200
    assert all(status == 200 and done and finish in ("stop", "length") for status, finish, done in results), results
    assert waits and max(waits) < 0.5, [round(w, 3) for w in waits]

"""Benchmark the server under concurrent users: continuous batching against the serialised server.

For each mode (`flashlm serve --batching serial`, then `--batching continuous`) in the same run, the
script starts `flashlm serve` on loopback in a subprocess, waits for /health, warms it up with one
request, and then:

- 50 concurrent streaming completions of `--tokens` tokens (default 32): aggregate tokens/s (completion
  tokens from each stream's usage over the wall time from the first request to the last [DONE]), time to
  first token (the first event carrying text) p50 / p99, failures;
- 200 concurrent streaming completions of 16 tokens: failures (a status other than 200, an error event,
  or a stream that does not end with a finish_reason and [DONE]), the server's peak RSS (VmHWM), and the
  latency of /health polled every 0.1 s while they run.

Every request is greedy from its own prompt (the stories the model's tokenizer was trained on), with
`--max-queue 512` so that the door's queue limit admits all 200. The model is built here unless
`--model DIR` names one: a random-init gemma model (d_model 384, 6 layers `LLLLLG`, window 64, 6 heads,
MLP 1024, vocabulary 1024, context 256; the decoding benchmark's shape) with a byte-level BPE trained on
the project's generated stories. It runs on the CPU in fp32 with one torch thread (`--server-threads`):
the load client runs on the same machine and needs a CPU of its own, and OpenMP threads spin-waiting on
an oversubscribed CPU slow a step tenfold, in both modes alike.

Goals (issue 26): at 50 streams, continuous >= 3x the serial aggregate tokens/s and p99 TTFT <= 1/3 of
serial's; at 200 streams 0 failures in both modes, every stream ending with finish_reason and [DONE].

    .venv/bin/python bench/serve_load.py                 # the recorded run (a few minutes on 2 CPUs)
    .venv/bin/python bench/serve_load.py --quick         # smoke run: 8 and 20 streams of 4 tokens
    .venv/bin/python bench/serve_load.py --report-only   # rewrite the docs section from the JSON

Results go to bench/results/serve_load.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from docs_section import replace_section

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "serve_load.json"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- serve_load:begin -->", "<!-- serve_load:end -->"
GOALS = {"speedup_tokens_per_s": 3.0, "ttft_p99_ratio": 1 / 3, "failures_200": 0}
SHAPE = dict(
    vocab_size=1024,
    d_model=384,
    n_layers=6,
    n_heads=6,
    n_kv_heads=6,
    head_dim=64,
    query_pre_attn_scalar=64.0,
    d_ff=1024,
    layer_pattern="LLLLLG",
    sliding_window=64,
    max_seq_len=256,
)
MODES = ("serial", "continuous")
HEALTH_EVERY_S = 0.1
RUN_LIMIT_S = 330  # the whole run stops by itself well inside ~6 minutes
# /health from a process of its own (the asyncio client's loop is busy with the streams): polls every
# HEALTH_EVERY_S until a line arrives on stdin, then prints [latency or -1 for a failure, ...] as JSON
HEALTH_POLLER = """
import json, select, sys, time
import httpx

waits = []
with httpx.Client(timeout=10) as client:
    while not select.select([sys.stdin], [], [], 0)[0]:
        start = time.perf_counter()
        try:
            ok = client.get(sys.argv[1] + "/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        waits.append(time.perf_counter() - start if ok else -1)
        time.sleep(float(sys.argv[2]))
print(json.dumps(waits))
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_model(out: Path) -> tuple[Path, list[str]]:
    """A random-init model with a BPE trained on generated stories; returns its folder and the prompts."""
    import torch

    from flashlm.config import get_preset, replace
    from flashlm.data.synthetic import story_corpus
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    stories = list(story_corpus(400, seed=0))
    tokenizer = Tokenizer.train(iter(stories), SHAPE["vocab_size"], show_progress=False)
    torch.manual_seed(0)
    model = FlashLM(replace(get_preset("nano"), **SHAPE)).eval()
    path = model.save_pretrained(out / "model", tokenizer=tokenizer)
    prompts = [" ".join(s.split()[:12]) for s in stories[:300]]
    return Path(path), prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_stream(client, base: str, prompt: str, tokens: int) -> dict[str, Any]:
    """One streaming completion: its time to first text, end time, tokens, finish_reason and [DONE]."""
    body = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    out: dict[str, Any] = {"ok": False, "ttft": None, "tokens": 0, "finish": None, "done": False, "error": None}
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
            if response.status_code != 200:
                out["error"] = f"HTTP {response.status_code}"
                await response.aread()
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out["error"] = event["error"]["message"]
                for choice in event.get("choices", []):
                    if choice.get("text") and out["ttft"] is None:
                        out["ttft"] = time.perf_counter() - start
                    out["finish"] = choice.get("finish_reason") or out["finish"]
                if event.get("usage"):
                    out["tokens"] = event["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - a failure to count, not to stop on
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["end"] = time.perf_counter() - start
    out["ok"] = out["error"] is None and out["done"] and out["finish"] in ("stop", "length")
    return out


async def load(base: str, prompts: list[str], streams: int, tokens: int, watch_health: bool) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        poller = None
        if watch_health:
            command = [sys.executable, "-c", HEALTH_POLLER, base, str(HEALTH_EVERY_S)]
            poller = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            await asyncio.sleep(1.0)  # its imports
        start = time.perf_counter()
        tasks = [
            asyncio.ensure_future(one_stream(client, base, prompts[i % len(prompts)], tokens)) for i in range(streams)
        ]
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        waits = json.loads(poller.communicate("stop\n", timeout=60)[0]) if poller is not None else []
    health = [w for w in waits if w >= 0]
    health_failures = len(waits) - len(health)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    total = sum(r["tokens"] for r in results)
    failures = [r for r in results if not r["ok"]]
    figures = {
        "streams": streams,
        "max_tokens": tokens,
        "wall_s": round(wall, 2),
        "completion_tokens": total,
        "tokens_per_s": round(total / wall, 1),
        "ttft_p50_s": _round(percentile(ttfts, 50)),
        "ttft_p99_s": _round(percentile(ttfts, 99)),
        "failures": len(failures),
        "failure_examples": sorted({str(r["error"] or f"finish={r['finish']} done={r['done']}") for r in failures})[:3],
        "all_end_with_finish_reason_and_done": all(r["done"] and r["finish"] for r in results),
    }
    if watch_health:
        figures.update(
            health_checks=len(health),
            health_failures=health_failures,
            health_p50_s=_round(percentile(health, 50)),
            health_max_s=_round(max(health) if health else None),
        )
    return figures


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run_mode(mode: str, model: Path, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "flashlm", "serve", str(model), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--batching", mode, "--max-batch", str(args.max_batch), "--max-queue", "512", "--log-level", "warning"]
    log(f"{mode}: starting {' '.join(command[2:])}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads)}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {mode} server did not start: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        rss_idle = peak_rss_mb(server.pid)
        asyncio.run(load(base, prompts, 2, 4, watch_health=False))  # warm-up
        log(f"{mode}: {args.streams} streams of {args.tokens} tokens")
        fifty = asyncio.run(load(base, prompts, args.streams, args.tokens, watch_health=False))
        log(f"{mode}: {fifty['tokens_per_s']} tok/s, TTFT p50 {fifty['ttft_p50_s']} s p99 {fifty['ttft_p99_s']} s")
        log(f"{mode}: {args.many} streams of {args.many_tokens} tokens, /health every {HEALTH_EVERY_S} s")
        many = asyncio.run(load(base, prompts, args.many, args.many_tokens, watch_health=True))
        many["peak_rss_mb"] = _round(peak_rss_mb(server.pid))
        log(
            f"{mode}: failures {many['failures']}, /health max {many['health_max_s']} s, "
            f"peak RSS {many['peak_rss_mb']} MB, {many['tokens_per_s']} tok/s"
        )
        return {"streams_50": fifty, "streams_200": many, "rss_before_load_mb": _round(rss_idle)}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a FlashLM model folder (default: build the one described above)")
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--many", type=int, default=200)
    parser.add_argument("--many-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="torch threads of the server (OMP_NUM_THREADS); the load client needs a CPU of its own",
    )
    parser.add_argument("--quick", action="store_true", help="8 and 20 streams of 4 tokens; writes nothing")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.report_only:
        write_section(json.loads(RESULTS.read_text(encoding="utf-8")))
        return
    if args.quick:
        args.streams, args.tokens, args.many, args.many_tokens = 8, 4, 20, 4
    from flashlm.hardware import machine_info

    started = time.time()
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            model, prompts = build_model(Path(tmp))
        else:
            from flashlm.data.synthetic import story_corpus

            model, prompts = args.model, [" ".join(s.split()[:12]) for s in story_corpus(300, seed=0)]
        modes = {}
        for mode in MODES:
            if time.time() - started > RUN_LIMIT_S:
                log(f"stopping: the run passed {RUN_LIMIT_S} s before the {mode} mode")
                break
            modes[mode] = run_mode(mode, model, prompts, args)
    report: dict[str, Any] = {
        "model": "built: " + json.dumps(SHAPE) if args.model is None else str(args.model),
        "max_batch": args.max_batch,
        "server_torch_threads": args.server_threads,
        "modes": modes,
        "goals": GOALS,
    }
    if len(modes) == 2:
        serial, cont = modes["serial"]["streams_50"], modes["continuous"]["streams_50"]
        report["speedup_tokens_per_s"] = round(cont["tokens_per_s"] / serial["tokens_per_s"], 2)
        report["ttft_p99_ratio"] = round(cont["ttft_p99_s"] / serial["ttft_p99_s"], 3)
        report["ttft_p50_ratio"] = round(cont["ttft_p50_s"] / serial["ttft_p50_s"], 3)
        report["failures_200"] = {m: modes[m]["streams_200"]["failures"] for m in MODES}
    report["machine"] = {**machine_info(), "load_before": load_before, "load_after": list(os.getloadavg())}
    report["run_s"] = round(time.time() - started, 1)
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    if args.quick:
        return
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_section(report)
    log(f"wrote {RESULTS.relative_to(REPO)} and the serve_load section of {DOC.relative_to(REPO)}")


def write_section(report: dict[str, Any]) -> None:
    m = report["machine"]
    modes = report["modes"]
    rows = []
    for label, key, fmt in (
        ("aggregate tokens/s, 50 streams", ("streams_50", "tokens_per_s"), "{:.0f}"),
        ("TTFT p50, 50 streams (s)", ("streams_50", "ttft_p50_s"), "{:.2f}"),
        ("TTFT p99, 50 streams (s)", ("streams_50", "ttft_p99_s"), "{:.2f}"),
        ("failures, 50 streams", ("streams_50", "failures"), "{}"),
        ("aggregate tokens/s, 200 streams", ("streams_200", "tokens_per_s"), "{:.0f}"),
        ("TTFT p99, 200 streams (s)", ("streams_200", "ttft_p99_s"), "{:.2f}"),
        ("failures, 200 streams", ("streams_200", "failures"), "{}"),
        (
            "every stream ends with finish_reason and [DONE]",
            ("streams_200", "all_end_with_finish_reason_and_done"),
            "{}",
        ),
        ("/health latency under 200 streams, max (s)", ("streams_200", "health_max_s"), "{:.3f}"),
        ("server peak RSS (MB)", ("streams_200", "peak_rss_mb"), "{:.0f}"),
    ):
        cells = []
        for mode in MODES:
            value = modes.get(mode, {}).get(key[0], {}).get(key[1])
            cells.append("-" if value is None else fmt.format(value))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    speedup, ratio = report.get("speedup_tokens_per_s"), report.get("ttft_p99_ratio")
    failures = report.get("failures_200", {})
    none_failed = bool(failures) and not any(failures.values())
    verdict = [
        f"aggregate tokens/s at 50 streams: continuous **{speedup}x** serial (goal >= 3x: "
        f"{'met' if speedup is not None and speedup >= 3 else 'NOT met'})",
        f"p99 TTFT at 50 streams: continuous **{ratio}** of serial (goal <= 0.333: "
        f"{'met' if ratio is not None and ratio <= 1 / 3 else 'NOT met'})",
        f"failures at 200 streams: {failures} (goal 0: {'met' if none_failed else 'NOT met'})",
    ]
    shape = report["model"]
    if shape.startswith("built: "):
        shape = "built here, " + ", ".join(f"{k} {v}" for k, v in json.loads(shape.removeprefix("built: ")).items())
    s50 = modes.get("serial", {}).get("streams_50", {})
    s200 = modes.get("serial", {}).get("streams_200", {})
    section = "\n".join(
        [
            BEGIN,
            "## Serving under load: continuous batching vs one request at a time (`bench/serve_load.py`)",
            "",
            f"`flashlm serve` on loopback in a subprocess, `--batching serial` then `--batching continuous` "
            f"(`--max-batch {report['max_batch']}`, `--max-queue 512`, {report.get('server_torch_threads', 1)} "
            "torch thread) in one run; the client is one asyncio "
            f"process (httpx) on the same machine. Model: {shape}, random init, fp32 on the CPU; greedy "
            f"streaming completions of generated-story prompts. {s50.get('streams', 50)} concurrent streams of "
            f"{s50.get('max_tokens', 32)} tokens, then {s200.get('streams', 200)} of {s200.get('max_tokens', 16)} "
            f"tokens with /health polled every {HEALTH_EVERY_S} s. Aggregate tokens/s = completion tokens "
            "(usage) / wall time from the first request to the last [DONE]; TTFT = time to the first event "
            "carrying text.",
            "",
            f"Machine: {m.get('cpu')}, {m.get('cpus')} CPUs, torch "
            f"{m.get('torch')}; load average before/after {m['load_before'][0]:.2f} / {m['load_after'][0]:.2f}; "
            f"whole run {report.get('run_s', 0) / 60:.1f} min.",
            "",
            "Goals (issue 26): at 50 streams >= 3x the serial aggregate tokens/s and p99 TTFT <= 1/3 of serial's; "
            "at 200 streams 0 failures, every stream ending with finish_reason and [DONE].",
            "",
            "| figure | serial | continuous |",
            "|---|---:|---:|",
            *rows,
            "",
            *[f"- {line}" for line in verdict],
            *[
                f"- an earlier run ({run['when']}; load average {run['load_before_after'][0]:.2f} / "
                f"{run['load_before_after'][1]:.2f}): {run['continuous_tokens_per_s']} vs "
                f"{run['serial_tokens_per_s']} tokens/s, **{run['speedup_tokens_per_s']}x**, p99 TTFT ratio "
                f"**{run['ttft_p99_ratio']}**, failures at 200 streams {run['failures_200']}"
                for run in report.get("earlier_runs", [])
            ],
            "",
            "The figures move with the machine's load (its load average is on the Machine line): read the "
            "ratios of one run, whose modes ran a minute apart, not the absolute rates.",
            "",
            "How it works: `flashlm.serve.batching.Scheduler` owns the model in one thread; at every step it "
            "retires finished or cancelled rows, runs each newcomer's prompt alone and moves its cache row "
            "into the left-padded batch, then decodes one token for every row with `DecodeStep`. Greedy "
            "output of a request is token-identical to the request alone (`tests/serve/test_batching.py`).",
            "",
            "Rerun: `.venv/bin/python bench/serve_load.py` (`--model DIR`, `--streams`, `--tokens`, `--many`, "
            "`--max-batch`, `--quick`; writes `bench/results/serve_load.json`; `--report-only` rewrites this "
            "section from it).",
            END,
        ]
    )
    replace_section(DOC, BEGIN, END, section)


if __name__ == "__main__":
    main()

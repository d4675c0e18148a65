"""The README's quickstart, run command for command as a user would type it (read out of README.md, so
the two cannot drift apart): generated corpus -> tokenizer -> shards -> train -> generate -> eval ppl ->
export hf -> serve, answered over HTTP by curl."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = [
    ("flashlm", "data"),
    ("flashlm", "data"),
    ("flashlm", "tokenizer"),
    ("flashlm", "data"),
    ("flashlm", "train"),
    ("flashlm", "generate"),
    ("flashlm", "eval"),
    ("flashlm", "export"),
    ("flashlm", "serve"),
    ("curl", "-s"),
]


def quickstart_commands() -> list[str]:
    """The command lines of the README's quickstart block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- quickstart:begin -->")[1].split("<!-- quickstart:end -->")[0]
    body = block.split("```bash\n")[1].split("```")[0]
    return [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def api_block() -> str:
    """The Python code of the README's API block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- api:begin -->")[1].split("<!-- api:end -->")[0]
    return block.split("```python\n")[1].split("```")[0]


def argv(words: list[str]) -> list[str]:
    """`flashlm ...` runs as `python -m flashlm ...` with this interpreter (the console script's entry point)."""
    return [sys.executable, "-m", "flashlm", *words[1:]] if words[0] == "flashlm" else words


def wait_until_listening(port: int, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}: {server.stdout.read()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the server did not listen on port {port} within {timeout:.0f} s")


def test_the_quickstart_block_is_the_documented_path():
    assert [tuple(shlex.split(c)[:2]) for c in quickstart_commands()] == STEPS


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the recipes, as in a clone's root
    # as a user runs it: with every core (the suite's one-thread default would halve the minute of training)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    outputs: list[str] = []
    server = None
    try:
        for command in quickstart_commands():
            words = shlex.split(command)
            if words[:2] == ["flashlm", "serve"]:
                server = subprocess.Popen(
                    argv(words), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
                wait_until_listening(int(words[words.index("--port") + 1]), server)
                outputs.append("")
                continue
            done = subprocess.run(argv(words), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
            outputs.append(done.stdout)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    generated, ppl_line, answer = outputs[5], outputs[6], json.loads(outputs[9])
    assert generated.startswith("Once upon a time") and len(generated.split()) > 10, generated
    loss = float(re.search(r"loss ([0-9.]+)", ppl_line).group(1))
    assert loss < math.log(4096) - 2.0, ppl_line + outputs[4][-400:]  # a minute of training learnt the stories
    run = tmp_path / "runs" / "quick"
    assert (run / "latest" / "tokenizer.json").is_file() and (run / "latest").resolve().parent.name == "checkpoints"
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert answer["object"] == "text_completion" and answer["choices"][0]["text"].strip(), answer

    api = subprocess.run(
        [sys.executable, "-c", api_block()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert api.returncode == 0, api.stderr[-3000:]
    assert api.stdout.startswith("Once upon a time") and len(api.stdout.split()) > 10, api.stdout
    assert (tmp_path / "runs" / "api" / "latest" / "model.safetensors").is_file()

"""Faults as tests: `flashlm train` in a subprocess, killed with SIGKILL at five points (one of them in the middle
of a checkpoint save) or stopped by SIGTERM / SIGINT, resumes to the losses of a run that was never interrupted,
bit for bit; under torchrun a signal on one rank stops every rank after the same step."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_utils import build_shards, tiny_config

from flashlm.cli import main
from flashlm.config import save_yaml
from flashlm.training.checkpoint import checkpoint_name, latest_checkpoint
from flashlm.training.loop import train
from flashlm.training.runlog import read_metrics

TESTS = str(Path(__file__).resolve().parents[1])
STEPS = 12
# the chain's run: a checkpoint every 3 steps, an evaluation every 3; peak_flops given, so no matmul is timed
SETTINGS = (f"train.steps={STEPS}", "train.eval_every=3", "train.peak_flops=1e9")
KEYS = ("step", "loss", "val_loss", "grad_norm", "lr")

# Runs `flashlm train` with one function stalled (patched in this throwaway process only, no hook in the
# library): at `point` it writes a marker file and sleeps, and the test kills it with SIGKILL there.
WRAPPER = """
import os, sys, time
from pathlib import Path
import torch
import flashlm.training.loop as loop
from flashlm.cli import main

point, step, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])


def stall():
    marker.write_text(str(os.getpid()))
    time.sleep(600)


if point == "in-step":  # before step `step`'s update: the previous step is logged, maybe saved
    take_step = loop.train_step
    def stalling_step(*args, **kwargs):
        if args[7] == step:
            stall()
        return take_step(*args, **kwargs)
    loop.train_step = stalling_step
elif point == "slow":  # every step takes 0.2 s more, so that a signal surely arrives mid-run
    take_step = loop.train_step
    def slow_step(*args, **kwargs):
        time.sleep(0.2)
        return take_step(*args, **kwargs)
    loop.train_step = slow_step
elif point == "mid-save":  # the weights written, the training state not yet (a .tmp-step_* folder)
    save = torch.save
    def stalling_save(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == step:
            stall()
        return save(obj, *args, **kwargs)
    torch.save = stalling_save
elif point == "before-latest":  # the checkpoint renamed into place, `latest` still at the previous one
    link = loop.link_latest
    def stalling_link(run, checkpoint):
        if Path(checkpoint).name == "step_%06d" % step:
            stall()
        return link(run, checkpoint)
    loop.link_latest = stalling_link
elif point == "mid-eval":  # in the first evaluation of this process
    loop.evaluate = lambda *args, **kwargs: stall()
sys.argv = ["flashlm", *sys.argv[4:]]
main()
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.getbasetemp() / "clm_shards")


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The uninterrupted run, in this process: its metric rows and final weights."""
    out = tmp_path_factory.mktemp("faults") / "whole"
    summary = train(tiny_config(shards, out, *SETTINGS))
    assert summary["step"] == STEPS and summary["stopped_by"] is None
    return [row_keys(r) for r in summary["history"]], final_weights(out)


def row_keys(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEYS)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / checkpoint_name(STEPS) / "model.safetensors"))


def write_config(path: Path, shards: Path, out: Path, *overrides: str) -> Path:
    save_yaml(tiny_config(shards, out, *SETTINGS, *overrides), path)
    return path


def start(args: list[str], log: Path) -> subprocess.Popen:
    """`args` in a subprocess, its stdout and stderr to the file `log` (a pipe nobody reads could fill up)."""
    with open(log, "w") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, text=True)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll `condition` until it holds; fail with the run's output if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) first:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.05)


def logged_step(out: Path) -> int:
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    return max((r["step"] for r in rows), default=0)


def resume_in_process(monkeypatch, capfd, args: list[str]) -> str:
    """`flashlm ARGS` in this process (no second interpreter to start); its stderr."""
    monkeypatch.setattr(sys, "argv", ["flashlm", *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capfd.readouterr().err
    assert info.value.code == 0, err[-3000:]
    return err


def assert_matches(out: Path, reference) -> None:
    rows, weights = reference
    assert [row_keys(r) for r in read_metrics(out / "metrics.jsonl")] == rows  # exact floats, every step
    final = final_weights(out)
    assert all(torch.equal(final[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_sigkill_at_five_points_then_resume_is_bit_identical(shards, reference, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", shards, out)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    marker = tmp_path / "stalled"
    checkpoints = out / "checkpoints"
    # (where it stalls and is killed, at which step, the checkpoint the next run resumes from)
    points = [
        ("in-step", 1, None),  # before the first update: nothing saved
        ("in-step", 5, 3),  # between checkpoints: step 4 logged, then lost
        ("mid-save", 6, 3),
        ("before-latest", 6, 6),
        ("mid-eval", 0, 6),  # the evaluation at step 9
    ]
    command = ["train", "--config", str(config), "--resume"]
    log = tmp_path / "log.txt"
    for point, step, resumes_from in points:
        marker.unlink(missing_ok=True)
        proc = start([sys.executable, str(wrapper), point, str(step), str(marker), *command], log)
        wait_for(marker.is_file, proc, log)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, point
        found = latest_checkpoint(checkpoints)
        assert (found.name if found else None) == (checkpoint_name(resumes_from) if resumes_from else None), point
        if point == "mid-save":
            assert (checkpoints / f".tmp-{checkpoint_name(6)}").is_dir()  # the interrupted save, left aside
        if point == "before-latest":
            assert os.readlink(out / "latest").endswith(checkpoint_name(3))  # not yet moved on
    err = resume_in_process(monkeypatch, capfd, command)
    assert f"resumed from {checkpoints / checkpoint_name(6)} at step 6" in err
    assert_matches(out, reference)
    assert os.readlink(out / "latest").endswith(checkpoint_name(STEPS))
    assert not list(checkpoints.glob(".tmp-*"))


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_saves_the_current_step_and_the_printed_command_resumes_bit_identically(
    shards, reference, tmp_path, sig, monkeypatch, capfd
):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", shards, out, "train.save_every=100")  # only the signal saves
    wrapper, log = tmp_path / "wrapper.py", tmp_path / "log.txt"
    wrapper.write_text(WRAPPER)
    args = [sys.executable, str(wrapper), "slow", "0", str(tmp_path / "unused"), "train", "--config", str(config)]
    proc = start(args, log)
    wait_for(lambda: logged_step(out) >= 2, proc, log)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    stderr = log.read_text()
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    step = logged_step(out)
    assert 2 <= step < STEPS
    assert last.startswith(f"stopped by {sig.name} after step {step}, checkpoint saved; resume with: flashlm train")
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / checkpoint_name(step)  # the current step
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command == ["flashlm", "train", "--config", str(config), "--resume"]
    err = resume_in_process(monkeypatch, capfd, command[1:])
    assert f"resumed from {out / 'checkpoints' / checkpoint_name(step)} at step {step}" in err
    assert_matches(out, reference)


DDP_RUNNER = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from train_utils import tiny_config
from flashlm.training.loop import train

out, rank = Path({out!r}), os.environ["RANK"]
(out.parent / ("pid" + rank)).write_text(str(os.getpid()))
settings = ("train.steps=100000", "train.batch_size=2", "train.save_every=100000", "train.eval_every=100000",
            "train.peak_flops=1e9")
summary = train(tiny_config(Path({data!r}), out, *settings), stop_on_signals=True)
(out.parent / ("summary" + rank + ".json")).write_text(json.dumps(
    {{k: summary[k] for k in ("step", "stopped_by", "checkpoint")}}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_under_torchrun_a_signal_on_one_rank_stops_both_after_the_same_step(shards, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "runner.py"
    script.write_text(DDP_RUNNER.format(tests=TESTS, out=str(out), data=str(shards)))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    log = tmp_path / "log.txt"
    proc = start([*launcher, "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)], log)
    pid = tmp_path / "pid1"
    wait_for(lambda: pid.is_file() and logged_step(out) >= 3, proc, log, timeout=180)
    os.kill(int(pid.read_text()), signal.SIGTERM)  # rank 1 only: rank 0 learns of it through the all-reduce
    proc.wait(timeout=180)
    assert proc.returncode == 0, log.read_text()[-3000:]
    summaries = [json.loads((tmp_path / f"summary{rank}.json").read_text()) for rank in (0, 1)]
    assert [(s["step"], s["stopped_by"]) for s in summaries] == [(summaries[0]["step"], "SIGTERM")] * 2, summaries
    step = summaries[0]["step"]
    assert step >= 3 and summaries[0]["checkpoint"].endswith(checkpoint_name(step))  # rank 0 writes it
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / checkpoint_name(step)

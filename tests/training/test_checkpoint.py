"""Checkpoints (flashlm.training.checkpoint): atomic saves, latest/resume resolution, damage detection."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_utils import build_shards, tiny_config

from flashlm.config import get_preset, replace
from flashlm.errors import CheckpointError
from flashlm.model.transformer import FlashLM
from flashlm.training.checkpoint import (
    STATE_FILE,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from flashlm.training.loop import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.getbasetemp() / "clm_shards")


def save_tiny(root: Path, step: int, keep_last: int | None = None) -> Path:
    cfg = get_preset("nano")
    model = FlashLM(cfg)
    state = {
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": step},
        "rng": capture_rng(),
        "config": {"model": cfg.to_dict(), "train": {}},
    }
    return save_checkpoint(root, step, model.state_dict(), cfg, state, keep_last=keep_last)


def test_save_load_round_trip_and_pruning(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_tiny(root, step, keep_last=2)
    (root / ".tmp-step_000009").mkdir()  # leftover of a crashed save: never "latest"
    assert [s for s, _ in list_checkpoints(root)] == [2, 3]
    assert latest_checkpoint(root) == root / "step_000003"
    model_state, state = load_checkpoint(root / "step_000003", get_preset("nano"))
    assert state["step"] == 3 and state["scheduler"] == {"last_epoch": 3} and "embed.weight" in model_state
    save_tiny(root, 4, keep_last=2)
    assert not (root / ".tmp-step_000009").exists()
    assert resolve_resume(True, tmp_path) == root / "step_000004"
    assert resolve_resume(str(tmp_path), "elsewhere") == root / "step_000004"
    assert resolve_resume(str(root / "step_000003"), tmp_path) == root / "step_000003"
    assert resolve_resume(False, tmp_path) is None and resolve_resume(True, tmp_path / "new") is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_rng_states_round_trip():
    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def damage_truncate_state(ckpt: Path) -> None:
    data = (ckpt / STATE_FILE).read_bytes()
    (ckpt / STATE_FILE).write_bytes(data[: len(data) // 2])


def damage_truncate_weights(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:100])


def damage_config(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["n_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(config))


def damage_state_keys(ckpt: Path) -> None:
    torch.save({"step": 1}, ckpt / STATE_FILE)


def damage_state_step(ckpt: Path) -> None:
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    torch.save({**state, "step": 7}, ckpt / STATE_FILE)


def damage_pickle(ckpt: Path) -> None:
    torch.save({"step": 1, "optimizer": object}, ckpt / STATE_FILE)  # not weights_only-loadable


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: (c / STATE_FILE).unlink(),
        lambda c: (c / "model.safetensors").unlink(),
        damage_truncate_state,
        damage_truncate_weights,
        damage_config,
        damage_state_keys,
        damage_state_step,
        damage_pickle,
    ],
    ids=[
        "no-state",
        "no-weights",
        "truncated-state",
        "truncated-weights",
        "config-vs-weights",
        "state-keys",
        "state-step",
        "unsafe-pickle",
    ],
)
def test_damaged_checkpoints_raise_one_clear_line(tmp_path, damage):
    ckpt = save_tiny(tmp_path, 1)
    damage(ckpt)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt, get_preset("nano"))
    assert "\n" not in str(info.value) and str(ckpt.name) in str(info.value)


def test_model_mismatch_with_the_run(tmp_path):
    ckpt = save_tiny(tmp_path, 1)
    with pytest.raises(CheckpointError, match="differs from this run"):
        load_checkpoint(ckpt, replace(get_preset("nano"), d_ff=256))


def test_resume_from_a_damaged_checkpoint_fails(shards, tmp_path):
    train(tiny_config(shards, tmp_path, "train.steps=2", "train.save_every=1"))
    damage_truncate_state(tmp_path / "checkpoints" / "step_000002")
    with pytest.raises(CheckpointError, match="damaged train state"):
        train(tiny_config(shards, tmp_path, "train.steps=4", "train.resume=true"))
    # an incomplete newer checkpoint (a missing file) is skipped: the previous complete one is used
    (tmp_path / "checkpoints" / "step_000002" / STATE_FILE).unlink()
    summary = train(tiny_config(shards, tmp_path, "train.steps=3", "train.resume=true"))
    assert summary["resumed_from"].endswith("step_000001")


# The run stalls while saving step 6, after the weights and before the training state: its torch.save of
# that state sleeps (patched in this throwaway process only, no hook in the checkpoint code).
RUNNER = """
import sys
import time
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from train_utils import tiny_config
from flashlm.training.loop import train

save = torch.save
def stalling_save(obj, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == 6:
        time.sleep(120)
    return save(obj, *args, **kwargs)
torch.save = stalling_save
train(tiny_config(Path({data!r}), Path({out!r})))
"""


def test_sigkill_while_saving_keeps_the_previous_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "run.py"
    script.write_text(RUNNER.format(tests=str(Path(__file__).resolve().parents[1]), data=str(shards), out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out / "checkpoints" / ".tmp-step_000006" / "model.safetensors"
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert partial.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timed out"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step_000003"
    load_checkpoint(out / "checkpoints" / "step_000003", get_preset("nano"))
    resumed = train(tiny_config(shards, out, "train.resume=true"))
    whole = train(tiny_config(shards, tmp_path / "whole"))
    assert resumed["resumed_from"].endswith("step_000003")
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in whole["history"][3:]]
    assert not (out / "checkpoints" / ".tmp-step_000006").exists()

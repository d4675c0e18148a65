"""The run log's integrations: Weights & Biases (offline, the same scalars as metrics.jsonl) and plain log
lines when the output is not a terminal."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import build_shards, tiny_config

from flashlm.errors import ConfigError
from flashlm.training import train
from flashlm.training.runlog import read_metrics

REPO = Path(__file__).resolve().parents[2]
LOGGED = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "train_seconds", "val_loss", "val_ppl")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.getbasetemp() / "clm_shards")


def wandb_history(run_file) -> list[dict]:
    """The history rows of an offline W&B run file (`run-*.wandb`): W&B's LevelDB-style log (a 7-byte
    header, 32 KiB blocks of records, each with a 7-byte header: CRC, length, kind) of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending, rows = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


def test_wandb_offline_run_logs_the_metrics_rows(shards, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # train.wandb_mode's default: offline
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(shards, tmp_path / "run", "train.steps=4", "train.eval_every=2", "train.wandb=true")
    train(cfg)
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history = {row["_step"]: row for row in wandb_history(runs[0])}
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sorted(history) == [row["step"] for row in metrics] == [1, 2, 3, 4]
    for row in metrics:
        logged = history[row["step"]]
        assert {k for k in row if k != "step"} <= set(logged)
        for key, value in row.items():
            if key != "step":
                assert logged[key] == pytest.approx(value, rel=1e-6), key
    assert set(LOGGED) <= set(history[2]) and "val_loss" not in history[1]


def test_wandb_not_installed_is_one_clear_line(shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = tiny_config(shards, tmp_path / "run", "train.steps=2", "train.wandb=true")
    with pytest.raises(ConfigError, match=r"^train\.wandb: the wandb package is not installed; pip install wandb"):
        train(cfg)


def test_wandb_online_without_a_login_is_one_clear_line(shards, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wb_config"))  # no saved login
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = tiny_config(shards, tmp_path / "run", "train.steps=2", "train.wandb=true", "train.wandb_mode=online")
    with pytest.raises(ConfigError, match=r"^train\.wandb: W&B could not start its online run \(.*\); log in with"):
        train(cfg)


def test_wandb_settings_are_checked(shards, tmp_path):
    with pytest.raises(ConfigError, match="train.wandb_mode: must be offline, online or disabled"):
        tiny_config(shards, tmp_path, "train.wandb_mode=sometimes").train.validate()


def docs_command() -> str:
    """The command of docs/elsewhere.md's tracking block (one shell line: continuation lines joined)."""
    text = (REPO / "docs" / "elsewhere.md").read_text(encoding="utf-8")
    block = text.split("<!-- tracking:begin -->")[1].split("<!-- tracking:end -->")[0]
    return block.split("```bash\n")[1].split("```")[0].replace("\\\n", " ").strip()


def test_docs_command_plain_lines_and_wandb(shards, tmp_path):
    """docs/elsewhere.md's tracking command, run by the shell as written: its output goes to a file (not a
    terminal), so train.log holds one plain line every log_every steps; W&B writes an offline run holding
    every metrics.jsonl row."""
    shutil.copytree(shards, tmp_path / "shards_txt")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"WANDB_SILENT": "true"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's `flashlm`
    command = docs_command()
    assert command.startswith("flashlm train ") and command.endswith("> train.log 2>&1")
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, timeout=300, capture_output=True, text=True)
    log = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, log + proc.stderr
    line = re.compile(
        r"^step (\d+)/6  loss (\d+\.\d{4})  lr \S+  [\d,]+ tok/s  MFU \d+\.\d%  ETA \d+:\d\d:\d\d$", re.MULTILINE
    )
    found = line.findall(log)
    assert [int(step) for step, _ in found] == [2, 4, 6], log
    metrics = read_metrics(tmp_path / "runs" / "tracked" / "metrics.jsonl")
    assert [f"{r['loss']:.4f}" for r in metrics if "loss" in r] == [loss for _, loss in found]
    assert "━" not in log  # no progress bar drawn into the log
    runs = sorted((tmp_path / "runs" / "tracked" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and f"wandb sync {runs[0].parent.relative_to(tmp_path)}" in log
    history = {row["_step"]: row for row in wandb_history(runs[0])}
    assert sorted(history) == [row["step"] for row in metrics]
    for row in metrics:
        assert all(history[row["step"]][k] == pytest.approx(v, rel=1e-6) for k, v in row.items() if k != "step")

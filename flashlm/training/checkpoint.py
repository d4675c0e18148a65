"""Atomic checkpoints: save, find the latest, load and validate.

A checkpoint is a directory ``<out>/checkpoints/step_000123/`` holding ``model.safetensors`` and
``config.json`` (a `FlashLM.from_pretrained` directory), ``tokenizer.json`` when the run has one,
``nsp_head.safetensors`` when the objective trains an NSP head (`FlashLMForPretraining.from_pretrained`),
and ``train_state.pt``: step, optimizer and schedule state, RNG states and the run config, stored
as tensors and primitive containers only, so it loads with ``torch.load(weights_only=True)``.

It is written under ``.tmp-step_000123``, every file fsynced, then renamed into place: a crash at
any moment leaves either the complete new checkpoint or none, and the previous ones intact. The
training loop then points ``<out>/latest`` at it, the stable name of a run's newest model.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashlm.config import ModelConfig
from flashlm.errors import CheckpointError
from flashlm.model.heads import nsp_state, save_nsp_head
from flashlm.model.transformer import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, FlashLM

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "train_state.pt"
LATEST_LINK = "latest"  # in a run folder: the newest checkpoint
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE)
STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "config")
FORMAT = 1
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


# ---- finding ------------------------------------------------------------------------------------
def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (all required files present) under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and all((path / f).is_file() for f in REQUIRED_FILES):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(resume: bool | str, out: str | Path) -> Path | None:
    """The checkpoint to resume from: None (fresh start), the latest under `out`, or a given path.

    A path may name a checkpoint, a checkpoints folder or a run folder (then its latest is used).
    """
    if resume is False or resume in ("", "false", "False"):
        return None
    if resume is True or resume in ("true", "True", "latest"):
        return latest_checkpoint(Path(out) / CHECKPOINTS_DIR)
    path = Path(resume)
    if (path / STATE_FILE).exists() or _NAME.match(path.name):
        return path
    found = latest_checkpoint(path / CHECKPOINTS_DIR) or latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"train.resume: no checkpoint at {path}; pass a step_* directory or a run folder that holds checkpoints/"
        )
    return found


# ---- saving -------------------------------------------------------------------------------------
def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    train_state: dict[str, Any],
    tokenizer_file: str | Path | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``root/step_<step>`` atomically from full (unsharded, CPU) states; prune to `keep_last`.

    An NSP head among the objective's weights (``train_state["objective"]``) is also written as
    ``nsp_head.safetensors``, so the checkpoint evaluates NSP like any pre-training model directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _model_from_state(model_state, model_cfg).save_pretrained(tmp)
    head = nsp_state(train_state.get("objective") or {})
    if head:
        save_nsp_head(tmp, head)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        _fsync(tmp / TOKENIZER_FILE)
    torch.save({"format": FORMAT, **train_state, "step": step}, tmp / STATE_FILE)
    _fsync(tmp / STATE_FILE)
    _fsync(tmp)
    _replace_dir(tmp, final)
    _fsync(root)
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def link_latest(run_dir: str | Path, checkpoint: str | Path) -> Path:
    """Point ``run_dir/latest`` at `checkpoint` (a relative symlink, swapped atomically), so a run folder
    always has one stable name for its newest checkpoint: ``flashlm generate runs/x/latest``."""
    run_dir = Path(run_dir)
    link, tmp = run_dir / LATEST_LINK, run_dir / f".{LATEST_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(checkpoint, run_dir), tmp)
    os.replace(tmp, link)
    return link


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, and leftovers of interrupted saves."""
    root = Path(root)
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".tmp-step_*"):
        shutil.rmtree(path, ignore_errors=True)


def _model_from_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> FlashLM:
    with torch.device("meta"):
        model = FlashLM(cfg)
    model.load_state_dict(state, assign=True)
    return model


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- loading ------------------------------------------------------------------------------------
def load_checkpoint(
    path: str | Path, model_cfg: ModelConfig | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, train state) of a checkpoint, checked for completeness and consistency.

    Raises CheckpointError with one line for a missing, truncated or inconsistent checkpoint, or
    when `model_cfg` (the run's model) differs from the checkpoint's.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name}; the checkpoint is incomplete, use another one")
    model = FlashLM.from_pretrained(path)
    state = load_train_state(path)
    saved = state["config"].get("model") if isinstance(state["config"], dict) else None
    if saved != model.cfg.to_dict():
        raise CheckpointError(
            f"{path}: {CONFIG_FILE} and {STATE_FILE} disagree on the model config; the checkpoint is inconsistent"
        )
    if model_cfg is not None and model_cfg.to_dict() != model.cfg.to_dict():
        diff = sorted(k for k, v in model_cfg.to_dict().items() if saved.get(k) != v)
        raise CheckpointError(
            f"{path}: the checkpoint's model differs from this run's ({', '.join(diff)}); "
            "resume with the same model config"
        )
    return model.state_dict(), state


def load_train_state(path: str | Path) -> dict[str, Any]:
    """train_state.pt of a checkpoint directory, loaded with weights_only=True and checked."""
    file = Path(path) / STATE_FILE
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the one-line error says it all
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {STATE_FILE}; the checkpoint is incomplete") from None
    except Exception as exc:  # truncated zip, bad pickle, disallowed type: all mean "damaged"
        raise CheckpointError(f"{file}: damaged train state ({_load_reason(exc)}); use an earlier checkpoint") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{file}: train state lacks {', '.join(missing)}; the checkpoint is damaged")
    match = _NAME.match(Path(path).name)
    if match and int(match.group(1)) != state["step"]:
        raise CheckpointError(
            f"{file}: holds step {state['step']} but the directory says {match.group(1)}; "
            "the checkpoint is inconsistent"
        )
    return state


def _load_reason(exc: Exception) -> str:
    """The gist of a torch.load failure, whole, on one line: torch's weights-only refusal is a paragraph of
    advice (with terminal colour codes) around one sentence, "WeightsUnpickler error: <what>"."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "WeightsUnpickler error:" in text:
        text = "refused by the weights-only loader: " + text.split("WeightsUnpickler error:", 1)[1].strip()
        text = text.split("\n\n")[0]  # the advice after it is a paragraph of its own
    text = " ".join(text.split())
    first = re.split(r"(?<=[\w)'\]])\. ", text, maxsplit=1)[0].rstrip(".")
    return first or type(exc).__name__


# ---- RNG state ----------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """torch, CUDA, numpy and Python RNG states as tensors and primitives (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo `capture_rng`: set every RNG back to the captured state."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

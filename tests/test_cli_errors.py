"""A user mistake on the command line is one clear line on stderr and a non-zero exit, never a traceback;
Ctrl-C is one line and exit code 130. The commands run through `flashlm.cli.main`, the real entry point."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from corpora import stories
from train_utils import build_shards

from flashlm import cli
from flashlm.cli.model import fit_prompt
from flashlm.config import get_preset
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import Tokenizer
from flashlm.training.checkpoint import STATE_FILE

UNWRITABLE = "/proc/flashlm-test"  # /proc refuses new folders, to root as well


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter(stories(300)), 512, show_progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A nano model (context 128) with its 512-token tokenizer."""
    torch.manual_seed(0)
    return FlashLM(get_preset("nano")).save_pretrained(tmp_path_factory.mktemp("cli") / "nano", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text("\n".join(stories(20)) + "\n")
    return path


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `flashlm ARGS`."""
    monkeypatch.setattr(sys, "argv", ["flashlm", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


def one_line_error(monkeypatch, capsys, *args: str) -> str:
    """The single stderr line of a refused command (exit code 2)."""
    code, _, err = run(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--config", "configs/causal.yaml", "--set", f"train.out={UNWRITABLE}", "--set", "train.data=nowhere"],
        ["data", "prepare", "--tokenizer", "nowhere", "--out", UNWRITABLE, "TEXT"],
        ["data", "stories", "--out", f"{UNWRITABLE}/stories.txt"],
        ["tokenizer", "train", "--out", UNWRITABLE, "TEXT"],
        ["eval", "ppl", "MODEL", "TEXT", "--out", UNWRITABLE],
        ["eval", "mlm", "MODEL", "nowhere", "--out", UNWRITABLE],
        ["export", "hf", "MODEL", "--out", UNWRITABLE],
        ["export", "gguf", "MODEL", "--out", f"{UNWRITABLE}/model.gguf"],
        ["eval", "ppl", "MODEL", "TEXT", "--out", "TEXT"],  # a file where a folder should be
    ],
    ids=["train", "data-prepare", "data-stories", "tokenizer", "eval-ppl", "eval-mlm", "hf", "gguf", "file"],
)
def test_an_unwritable_output_is_refused_before_any_work(monkeypatch, capsys, model_dir, text_file, args):
    args = [{"MODEL": str(model_dir), "TEXT": str(text_file)}.get(a, a) for a in args]
    line = one_line_error(monkeypatch, capsys, *args)
    # named before anything else is looked at: the missing data or tokenizer is never reached
    assert ("train.out" if args[0] == "train" else "--out") in line and "cannot write" in line, line


def test_eval_ppl_refuses_a_window_beyond_the_models_context(monkeypatch, capsys, model_dir, text_file, tmp_path):
    line = one_line_error(
        monkeypatch, capsys, "eval", "ppl", model_dir, text_file, "--seq-len", 100000, "--out", tmp_path / "a" / "b"
    )
    assert "--seq-len" in line and "128" in line, line
    assert not list(tmp_path.iterdir())  # nothing written: not even the folders made to check --out


@pytest.mark.parametrize(
    "option, value",
    [
        ("--max-new-tokens", "-1"),
        ("--temperature", "-0.5"),
        ("--top-k", "0"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--repetition-penalty", "0"),
        ("--repetition-penalty", "-1"),
    ],
)
def test_out_of_range_sampling_options_are_one_line_each(monkeypatch, capsys, model_dir, option, value):
    line = one_line_error(monkeypatch, capsys, "generate", model_dir, "-p", "Once", option, value)
    assert line.startswith("error: ") and option in line, line


def test_a_prompt_longer_than_the_context_keeps_its_end_and_says_so(monkeypatch, capsys, model_dir, tokenizer):
    prompt = " ".join(f"word{i}" for i in range(300))  # far more tokens than the context of 128
    assert len(tokenizer.encode(prompt)) > 128
    code, out, err = run(monkeypatch, capsys, "generate", model_dir, "-p", prompt, "--max-new-tokens", 8, "--seed", 0)
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 1 and "kept its last" in lines[0], err
    kept_tokens = int(lines[0].split("kept its last ")[1].split()[0])
    assert 0 < kept_tokens <= 128 - 8 - 1  # room for <bos> and the 8 new tokens
    kept = fit_prompt(tokenizer, prompt, 128, 8)
    assert out.startswith(kept) and prompt.endswith(kept.strip())  # the end of the prompt, then the completion
    assert len(tokenizer.encode(kept, add_bos=True)) <= 128 - 8
    capsys.readouterr()
    assert fit_prompt(tokenizer, "Once upon a time", 128, 500) == "Once upon a time"  # a short prompt is untouched
    room = 128 - len(tokenizer.encode("Once upon a time", add_bos=True))
    assert f"at most {room} of the 500 new tokens asked for fit" in capsys.readouterr().err  # the cap is said


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_at_load(monkeypatch, capsys, tmp_path, tokenizer):
    small = FlashLM(replace(get_preset("nano"), vocab_size=300)).save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    commands = (
        ["generate", small, "-p", "Once"],
        ["fill-mask", small, "The <mask> sat."],
        ["chat", small],
        ["export", "hf", small, "--out", tmp_path / "hf"],  # a checkpoint that would fail in transformers
    )
    for args in commands:
        line = one_line_error(monkeypatch, capsys, *args)
        assert "512 ids" in line and "300" in line, line
    assert not (tmp_path / "hf").exists()


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys, model_dir, text_file, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("flashlm.evaluate.lm.perplexity", interrupted)
    monkeypatch.setattr("flashlm.training.train", interrupted)
    train = ["train", "--config", "configs/causal.yaml", "--set", f"train.out={tmp_path / 'run'}"]
    for args in (["eval", "ppl", model_dir, text_file, "--out", tmp_path], train):
        code, _, err = run(monkeypatch, capsys, *args)
        assert code == 130 and err.strip() == "interrupted (Ctrl-C)", (code, err)


@pytest.mark.parametrize(
    "error",
    [MemoryError("Unable to allocate 48.4 GiB"), RuntimeError("DefaultCPUAllocator: can't allocate 8 bytes")],
    ids=["numpy", "torch-cpu"],
)
def test_out_of_memory_is_one_line(monkeypatch, capsys, tmp_path, error):
    """Sizes too large for the machine (a batch of 10^8 rows): one line that says which knobs to turn."""

    def too_big(*args, **kwargs):
        raise error

    monkeypatch.setattr("flashlm.training.train", too_big)
    line = one_line_error(
        monkeypatch, capsys, "train", "--config", "configs/causal.yaml", "--set", f"train.out={tmp_path / 'run'}"
    )
    assert line.startswith("error: out of memory (") and "lower the batch size" in line, line


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.getbasetemp() / "clm_shards")


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    settings = ["model.preset=nano", f"train.data={shards}", f"train.out={out}", "train.steps=1", "train.seq_len=32"]
    settings += ["train.batch_size=2", "train.device=cpu", "train.precision=fp32", "train.peak_flops=1e9"]
    return ["train", "--config", "configs/causal.yaml", *(a for s in settings for a in ("--set", s)), *extra]


def test_train_refuses_a_non_empty_folder_that_is_not_a_run(monkeypatch, capsys, shards, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    line = one_line_error(monkeypatch, capsys, *train_args(shards, out))
    assert "train.out" in line and "not empty" in line, line
    assert (out / "metrics.jsonl").read_text() == '{"mine": 1}\n' and len(list(out.iterdir())) == 1


class Shell:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda f: torch.save({"step": 1, "optimizer": object}, f), "Unsupported global: GLOBAL object"),
        (lambda f: f.write_bytes(pickle.dumps(Shell(), protocol=4)), "Unsupported operand"),  # torch warns too
    ],
    ids=["disallowed-global", "plain-pickle"],
)
def test_a_rejected_train_state_is_one_clean_line(monkeypatch, capsys, shards, tmp_path, damage, reason):
    code, _, err = run(monkeypatch, capsys, *train_args(shards, tmp_path))
    assert code == 0, err
    damage(tmp_path / "checkpoints" / "step_000001" / STATE_FILE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = one_line_error(monkeypatch, capsys, *train_args(shards, tmp_path, "--resume"))
    assert not [w for w in caught if "torch" in str(w.filename)], [str(w.message) for w in caught]
    assert "damaged train state" in line and reason in line and "\x1b" not in line and "pwned" not in line, line
    assert line.endswith("); use an earlier checkpoint"), line  # the reason whole, not cut mid-word


def test_the_installed_entry_point_prints_one_line_too(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "flashlm", "generate", str(model_dir), "-p", "Once", "--top-k", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--top-k" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_first_line_quotes_one_line_of_any_message():
    """What a one-line error quotes of a library's complaint: its first line, or its type when it is empty."""
    from flashlm.errors import first_line

    assert first_line(ValueError("  bad header\n  at byte 12\n")) == "bad header"
    assert first_line(OSError()) == "OSError"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("frobnicate",), r"No such command 'frobnicate'.*flashlm --help"),
        (("generate",), r"Missing argument.*flashlm generate --help"),
        (("generate", "m", "-p", "hi", "--bogus"), r"No such option: --bogus"),
        (("generate", "m", "-p", "hi", "--max-new-tokens", "abc"), r"Invalid value for '--max-new-tokens'"),
        (("chat", "m", "--temperature", "-1"), r"Invalid value for '--temperature'"),
        (("serve", "m", "--port", "70000"), r"Invalid value for '--port'"),
        (("eval", "nsp", "m", "s", "--pairs", "0"), r"Invalid value for '--pairs'"),
        (("generate", "m", "-p", "hi", "--seed", str(2**70)), r"Invalid value for '--seed'"),
        (("serve", "m", "--log-level", "bogus"), r"--log-level must be one of"),
        (("eval", "mlm", "m", "s", "--rate", "1.5"), r"Invalid value for '--rate'"),
        (("eval", "mlm", "m", "s", "--rate", "0"), r"--rate must be above 0"),
        (("eval", "ppl", "m", "t", "--stride", "0"), r"Invalid value for '--stride'"),
    ],
    ids=[
        *("command", "argument", "option", "type", "chat-range", "serve-range", "pairs", "seed", "log-level"),
        *("mlm-rate", "mlm-rate-0", "stride"),
    ],
)
def test_usage_errors_are_one_line(monkeypatch, capsys, args, message):
    """Click's own refusals (unknown command or option, missing argument, a value outside an option's
    declared range) are one line with exit code 2, as typer raises them (its own copy of click)."""
    import re

    line = one_line_error(monkeypatch, capsys, *args)
    assert re.search(message, line), line


def test_no_arguments_shows_the_help(monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys)
    assert code == 0 and "Usage:" in out and "generate" in out and "Traceback" not in err


def test_train_minutes_must_be_positive(monkeypatch, capsys, tmp_path):
    """--minutes 0 would mean "no time budget" with no step limit: a run that never ends."""
    args = ("train", "--config", "configs/causal.yaml", "--minutes", "0", "--set", f"train.out={tmp_path / 'run'}")
    line = one_line_error(monkeypatch, capsys, *args)
    assert "--minutes must be positive" in line and not (tmp_path / "run").exists()


def test_outputs_never_overwrite_a_folder_holding_other_files(monkeypatch, capsys, model_dir, text_file, tmp_path):
    """export/import, tokenizer train and data prepare refuse an --out that holds other files (a model, the
    input itself), leaving every file as it was; a folder of earlier shards or a lone tokenizer.json may be
    replaced."""
    import shutil

    victim = tmp_path / "victim"
    shutil.copytree(model_dir, victim)
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    for args in (
        ("export", "hf", model_dir, "--out", victim),
        ("export", "hf", victim, "--out", victim),
        ("tokenizer", "train", text_file, "--vocab-size", 300, "--out", victim),
        ("data", "prepare", text_file, "--tokenizer", model_dir, "--out", victim),
    ):
        assert "already holds files" in one_line_error(monkeypatch, capsys, *map(str, args))
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before
    tok = tmp_path / "tok"
    for _ in range(2):  # a tokenizer folder may be trained again
        assert run(monkeypatch, capsys, "tokenizer", "train", text_file, "--vocab-size", 300, "--out", tok)[0] == 0
    shards = tmp_path / "shards"
    for _ in range(2):  # and shards prepared again
        assert run(monkeypatch, capsys, "data", "prepare", text_file, "--tokenizer", tok, "--out", shards)[0] == 0


@pytest.mark.parametrize("command", ["chat", "explain", "fill-mask"])
@pytest.mark.parametrize("device", ["bogus", "cuda"])
def test_a_device_that_is_not_there_is_one_line(monkeypatch, capsys, model_dir, command, device):
    """A misspelt device, or CUDA on a machine without it, is named as such (not as a damaged checkpoint)."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    extra = {"chat": [], "explain": ["Once upon a time"], "fill-mask": ["Once upon a <mask>"]}[command]
    line = one_line_error(monkeypatch, capsys, command, model_dir, *extra, "--device", device)
    assert f"device {device!r}" in line and ("not a device" in line or "CUDA is not available" in line), line


def test_chat_reads_bytes_that_are_not_utf8(monkeypatch, capsys, model_dir):
    """A terminal that sends Latin-1 bytes gets a reply (the bad byte read as U+FFFD), not a traceback."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8"))
    code, _, err = run(monkeypatch, capsys, "chat", model_dir, "--max-new-tokens", "3", "--seed", "0")
    assert code == 0 and "Traceback" not in err, err


def test_serve_on_a_port_in_use_is_one_line_before_loading(monkeypatch, capsys, tmp_path):
    """Another server on the port: one line naming it, before the model loads (uvicorn would log several)."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = one_line_error(monkeypatch, capsys, "serve", tmp_path / "no-model", "--port", str(port))
    assert f"--port {port}: cannot listen there" in line, line


def test_missing_inputs_of_demo_and_eval_all_stop_before_any_work(monkeypatch, capsys, model_dir, tmp_path):
    """A typo in a data path is one line and leaves no output folder (not a half-built demo, not a report
    that lists the task as failed)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    nope = tmp_path / "nope.txt"
    for args, message in (
        (("demo", "--out", tmp_path / "demo", "--data", nope), "no such file or directory"),
        (("demo", "--out", tmp_path / "demo", "--data", empty), "empty corpus"),
        (("eval", "all", model_dir, "--tasks", "ppl", "--data", nope, "--out", tmp_path / "r"), f"--data {nope}"),
    ):
        assert message in one_line_error(monkeypatch, capsys, *map(str, args))
    assert not (tmp_path / "demo").exists() and not (tmp_path / "r").exists()

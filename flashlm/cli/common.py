"""What several command groups share: the stderr console, the --precision and sampling checks, device and
model loading (with the tokenizer-fits-the-model check), the writable-output check, the one-line result
echo and the masked-prediction convention option."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)
INFERENCE_PRECISION = (
    "auto (bf16 weights on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16 "
    "(much slower on CPUs without native bf16)."
)


def check_precision(value: str) -> str:
    """`value` if it is a known precision, else a ConfigError naming the choices."""
    from flashlm.errors import ConfigError
    from flashlm.hardware import PRECISIONS

    if value not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def sampling_options(command: str, **options):
    """`flashlm.generation.Sampling(**options)`, its range checks turned into one ConfigError line that
    names the command."""
    from flashlm.errors import ConfigError
    from flashlm.generation import Sampling

    try:
        return Sampling(**options)
    except ValueError as exc:
        raise ConfigError(f"{command}: " + " ".join(str(exc).split())) from None


def check_minutes(minutes: float | None, hint: str = "") -> None:
    """--minutes, when given, must be a positive, finite number of minutes (NaN is neither)."""
    from flashlm.errors import ConfigError

    if minutes is not None and not 0 < minutes < float("inf"):
        raise ConfigError(f"--minutes must be positive and finite, got {minutes:g}{hint}")


SEED_MAX = 2**63 - 1  # the largest seed torch.manual_seed takes


def eval_device(device: str) -> str:
    """--device, checked: "auto" is cuda when available, else cpu; cuda where none is, one line."""
    from flashlm.hardware import default_device

    return str(default_device(device))


def eval_load(model_dir: Path, device: str, tokenizer: bool = True):
    """(model, tokenizer) of a model directory, on `device`."""
    return load_model(model_dir, tokenizer, device=eval_device(device))


def load_model(model_dir: Path, tokenizer: bool = True, **kwargs):
    """(model, tokenizer or None) of a model directory (`kwargs` go to `FlashLM.from_pretrained`); a tokenizer
    with more ids than the model's vocabulary is refused here, not as an IndexError mid-generation."""
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    model = FlashLM.from_pretrained(model_dir, **kwargs)
    if not tokenizer:
        return model, None
    tok = Tokenizer.load(model_dir)
    tok.check_fits(model.cfg.vocab_size, model_dir)
    return model, tok


def writable_dir(path: Path | str, option: str = "--out", keep: bool = False) -> Path:
    """`path` as a folder this process can write in, checked before any work starts (folders are created to
    probe it, then removed again unless `keep`: a refused command leaves nothing behind); else a one-line
    FlashLMError naming `option`. `keep` suits commands run by several processes at once (torchrun ranks)."""
    from flashlm.errors import FlashLMError

    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".flashlm-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FlashLMError(f"{option}: cannot write in {path} ({reason}); choose a folder you can write to") from None
    finally:
        for folder in [] if keep else created:
            try:
                folder.rmdir()
            except OSError:  # not made by us after all, or no longer empty
                break
    return path


def writable_out(value: Path | None) -> Path | None:
    """A typer callback for an --out folder option: `writable_dir` at parse time, before the command runs."""
    return None if value is None else writable_dir(value, "--out")


def new_out(value: Path | None) -> Path | None:
    """A typer callback for an --out folder a command fills with a model or a tokenizer: writable, and new or
    empty. Writing into a folder that holds files (another model, the input itself) would leave a mix of two."""
    return _refuse_held_files(writable_out(value), "a new or empty folder")


def shards_out(value: Path | None) -> Path | None:
    """A typer callback for `data prepare --out`: writable, and new, empty or earlier shards (replaced whole)."""
    from flashlm.data.shards import META_FILE

    path = writable_out(value)
    if path is not None and (path / META_FILE).is_file():
        return path
    return _refuse_held_files(path, "a new or empty folder, or one holding earlier shards")


def tokenizer_out(value: Path | None) -> Path | None:
    """A typer callback for `tokenizer train --out`: writable, and new, empty or holding only a tokenizer.json."""
    from flashlm.tokenizer import TOKENIZER_FILE

    path = writable_out(value)
    if path is not None and path.is_dir() and {p.name for p in path.iterdir()} <= {TOKENIZER_FILE}:
        return path
    return _refuse_held_files(path, "a new or empty folder, or one holding only an earlier tokenizer.json")


def _refuse_held_files(path: Path | None, wanted: str) -> Path | None:
    from flashlm.errors import FlashLMError

    if path is not None and path.is_dir() and any(path.iterdir()):
        raise FlashLMError(f"--out {path} already holds files this command would overwrite in part; choose {wanted}")
    return path


def writable_parent(value: Path | None) -> Path | None:
    """A typer callback for an --out file option: its folder must be writable (checked at parse time)."""
    if value is not None:
        writable_dir(Path(value).parent, "--out")
    return value


def eval_echo(task: str, results: dict, path: Path, keys: tuple[str, ...]) -> None:
    """One line: the task, the `keys` of its results and where they were written."""
    shown = ", ".join(f"{k} {results[k]:.4g}" if isinstance(results[k], float) else f"{k} {results[k]}" for k in keys)
    typer.echo(f"{task}: {shown}; written to {path}")


def next_token_convention(model_dir: Path, flag: bool | None) -> bool:
    """The masked-prediction convention: the flag, else the checkpoint's training config, else next-token."""
    from flashlm.evaluate.masked import trained_next_token

    return trained_next_token(model_dir) if flag is None else flag


CONVENTION = typer.Option(
    "--next-token/--in-place",
    help="Masked next-token (GPT-BERT) or in-place (BERT) prediction; default: "
    "what the checkpoint was trained with, else next-token.",
)

"""A pre-training run's log: metrics.jsonl, optional TensorBoard and Weights & Biases, a progress bar
(or, when the console is not a terminal, plain lines) and the loss plot."""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flashlm.config import RunConfig, save_yaml
from flashlm.errors import ConfigError
from flashlm.hardware import default_device, resolve_precision
from flashlm.training.progress import progress_bar

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"
RUN_CONFIG_FILE = "config.yaml"  # what RunLog writes first into a run folder: it marks one


class RunLog:
    """metrics.jsonl, optional TensorBoard / W&B and the progress display; silent off rank 0.

    On a terminal (or Jupyter) the display is a live rich progress bar on stderr. Elsewhere (CI, nohup,
    a pipe) a live bar shows nothing until the end, so every logged step prints one plain line there
    instead: step, loss, lr, tokens/s, MFU and the estimated time left.
    """

    def __init__(self, cfg: RunConfig, enabled: bool, start: int) -> None:
        self.enabled, self.out = enabled, Path(cfg.train.out)
        self.progress, self.task, self.writer, self.wandb = None, None, None, None
        self.console: Any = None
        if not enabled:
            return
        from rich.console import Console

        self.out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, self.out / RUN_CONFIG_FILE)
        _truncate_metrics(self.out / METRICS_FILE, start)
        tcfg = cfg.train
        self.steps, self.minutes, self.start, self.began = tcfg.steps, tcfg.minutes, start, time.perf_counter()
        if tcfg.wandb:  # before the bar starts: a missing package is a one-line error, not a broken display
            self.wandb = _wandb_run(cfg, self.out)
        self.console = Console(stderr=True)
        precision = resolve_precision(tcfg.precision, default_device(tcfg.device))
        if self.console.is_terminal or self.console.is_jupyter:
            self.progress = _progress_bar()
            total = None if tcfg.minutes else tcfg.steps  # a timed run ends on the clock
            self.task = self.progress.add_task(
                "train", total=total, completed=start, loss="-", tps="-", mfu="-", precision=precision
            )
            self.progress.start()
            self.console = self.progress.console
        else:
            self.print(f"train: {precision}, plain log lines every {tcfg.log_every} steps (not a terminal)")
        if tcfg.tensorboard:
            self.writer = _tensorboard(self.out / "tensorboard", self.print)
        if self.wandb is not None:
            self.print(_wandb_line(self.wandb, _wandb_mode(tcfg.wandb_mode)))

    def print(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def advance(self, row: dict[str, Any]) -> None:
        if self.progress is None:
            if self.console is not None and "loss" in row:
                self.print(self._plain_line(row))
            return
        fields = {}
        if "loss" in row:
            fields = {"loss": f"{row['loss']:.4f}", "tps": f"{row['tokens_per_s']:,.0f}", "mfu": f"{row['mfu']:.1%}"}
        self.progress.update(self.task, advance=1, **fields)

    def _plain_line(self, row: dict[str, Any]) -> str:
        step = row["step"]
        total = f"/{self.steps}" if not self.minutes else ""
        return (
            f"step {step}{total}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  {row['tokens_per_s']:,.0f} tok/s  "
            f"MFU {row['mfu']:.1%}  ETA {_clock(self._seconds_left(step, row.get('train_seconds')))}"
        )

    def _seconds_left(self, step: int, train_seconds: float | None) -> float:
        """Wall time left at this run's pace so far; a timed run also ends when its budget is spent."""
        done = max(step - self.start, 1)
        left = (time.perf_counter() - self.began) / done * max(self.steps - step, 0)
        if self.minutes and train_seconds is not None:
            left = min(left, max(self.minutes * 60 - train_seconds, 0.0))
        return left

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if "val_loss" in row:
            extra = f", bpb {row['val_bpb']:.4f}" if "val_bpb" in row else ""
            self.print(f"step {row['step']}: val loss {row['val_loss']:.4f}, ppl {row['val_ppl']:.2f}{extra}")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.enabled:
            plot_losses(self.out / METRICS_FILE, self.out / PLOT_FILE)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _wandb_run(cfg: RunConfig, out: Path) -> Any:
    """A W&B run for train.wandb: project train.wandb_project, mode train.wandb_mode (else WANDB_MODE, else
    offline, which needs no account or network), files under WANDB_DIR or the run folder."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "train.wandb: the wandb package is not installed; pip install wandb (or 'flashlm[wandb]'), "
            "or set train.wandb=false"
        ) from None
    tcfg = cfg.train
    mode = _wandb_mode(tcfg.wandb_mode)
    try:
        return wandb.init(
            project=tcfg.wandb_project,
            name=out.name,
            mode=mode,
            dir=os.environ.get("WANDB_DIR") or str(out),
            config=cfg.to_dict(),
            settings=wandb.Settings(silent=True, console="off"),  # FlashLM prints; W&B must not wrap stdout
        )
    except wandb.errors.Error as exc:  # e.g. online without an API key
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"train.wandb: W&B could not start its {mode} run ({reason}); log in with `wandb login`, "
            "or set train.wandb_mode=offline"
        ) from None


def _wandb_mode(setting: str) -> str:
    """train.wandb_mode, else WANDB_MODE (its old spellings dryrun and run too), else offline."""
    mode = setting or os.environ.get("WANDB_MODE") or "offline"
    return {"dryrun": "offline", "run": "online"}.get(mode, mode)


def _wandb_line(run: Any, mode: str) -> str:
    if mode == "disabled":
        return "wandb: disabled (train.wandb_mode or WANDB_MODE)"
    if mode == "offline":
        folder = Path(run.dir).parent
        return f"wandb: offline run in {folder} (upload it with: wandb sync {folder})"
    return f"wandb: {getattr(run, 'url', None) or run.dir}"


def _progress_bar() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    return progress_bar(
        TextColumn("[bold]train[/] {task.fields[precision]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("MFU {task.fields[mfu]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )


def _tensorboard(directory: Path, warn: Callable[[str], None]) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("train.tensorboard: tensorboard is not installed (pip install tensorboard); skipping it")
        return None
    return SummaryWriter(str(directory))


def _truncate_metrics(path: Path, start: int) -> None:
    """Drop rows past the resumed step (a killed run may have logged beyond its last checkpoint)."""
    if not path.is_file():
        return
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= start] if start else []
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (a torn last line is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_losses(metrics_file: str | Path, png: str | Path) -> Path | None:
    """Every numeric "*loss*" series of a metrics.jsonl against step, as a PNG (matplotlib's Agg
    canvas, no pyplot); validation series drawn with markers. None when there is nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_file) if Path(metrics_file).is_file() else []
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if "loss" in key and isinstance(value, (int, float)) and "step" in row:
                steps, values = series.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(value)
    if not series:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, (steps, values) in series.items():
        ax.plot(steps, values, "o-" if key.startswith("val") else "-", label=key)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="FlashLM training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    return Path(png)

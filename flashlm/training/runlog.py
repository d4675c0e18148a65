"""A pre-training run's log: metrics.jsonl, optional TensorBoard, a progress bar and the loss plot."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flashlm.config import RunConfig, save_yaml
from flashlm.hardware import default_device, resolve_precision
from flashlm.training.progress import progress_bar

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"


class RunLog:
    """metrics.jsonl, optional TensorBoard and a rich progress bar; silent off rank 0."""

    def __init__(self, cfg: RunConfig, enabled: bool, start: int) -> None:
        self.enabled, self.out = enabled, Path(cfg.train.out)
        self.progress, self.task, self.writer = None, None, None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, self.out / "config.yaml")
        _truncate_metrics(self.out / METRICS_FILE, start)
        self.progress = _progress_bar()
        total = None if cfg.train.minutes else cfg.train.steps  # a timed run ends on the clock
        precision = resolve_precision(cfg.train.precision, default_device(cfg.train.device))
        self.task = self.progress.add_task(
            "train", total=total, completed=start, loss="-", tps="-", mfu="-", precision=precision
        )
        self.progress.start()
        if cfg.train.tensorboard:
            self.writer = _tensorboard(self.out / "tensorboard", self.print)

    def print(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, highlight=False)

    def advance(self, row: dict[str, Any]) -> None:
        if self.progress is None:
            return
        fields = {}
        if "loss" in row:
            fields = {"loss": f"{row['loss']:.4f}", "tps": f"{row['tokens_per_s']:,.0f}", "mfu": f"{row['mfu']:.1%}"}
        self.progress.update(self.task, advance=1, **fields)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if "val_loss" in row:
            extra = f", bpb {row['val_bpb']:.4f}" if "val_bpb" in row else ""
            self.print(f"step {row['step']}: val loss {row['val_loss']:.4f}, ppl {row['val_ppl']:.2f}{extra}")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
        if self.enabled:
            plot_losses(self.out / METRICS_FILE, self.out / PLOT_FILE)


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

"""The progress bar of every FlashLM training job (pre-training, fine-tuning, teacher caching): rich, on
stderr, so that stdout stays for results."""

from __future__ import annotations

from typing import Any


def progress_bar(*columns: Any) -> Any:
    """A `rich.progress.Progress` on stderr; `columns` are rich column objects or format strings."""
    from rich.console import Console
    from rich.progress import Progress

    return Progress(*columns, console=Console(stderr=True))

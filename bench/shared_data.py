"""Where the benchmarks find their public corpora, and the one-line refusal when a corpus is missing.

Every corpus path is a command-line option of its benchmark; the defaults point into ../shared/data
beside the clone. A benchmark checks its paths before doing any work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shown(path: Path) -> str:
    """`path` relative to the working directory when that is shorter (../shared/data/... from the repo)."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return relative if len(relative) < len(str(path)) else str(path)


def require(script: str, paths: list[Path], what: str, option: str) -> None:
    """Exit with one line naming `option` unless every path in `paths` exists."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        sys.exit(f"bench/{script}: no {what} at {shown(missing[0])}; pass {option}")

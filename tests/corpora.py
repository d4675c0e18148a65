"""Where the suite's text comes from.

The core of the suite runs on text the project generates itself (`flashlm.data.synthetic`), so a bare
clone passes `make test`. Tests that need real public text (the stories260K reference, bAbI, Multi30k,
TinyStories quality checks) ask for it through `real_data`: it is read from ``../shared/data`` next to
the clone when that folder exists and the test is skipped, with the reason, when it does not. CI sets
``FLASHLM_REQUIRE_SHARED_DATA=1`` so that an absent folder fails those tests instead of skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flashlm.data.synthetic import story_corpus

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REQUIRE_ENV = "FLASHLM_REQUIRE_SHARED_DATA"


def real_data(relative: str) -> Path:
    """``../shared/data/<relative>``; skip the calling test when it is absent (fail when CI requires it)."""
    path = SHARED_DATA / relative
    if path.exists():
        return path
    reason = f"needs real public data at ../shared/data/{relative}, which is not beside this clone"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1 requires it)")
    pytest.skip(reason)


def stories(n: int, seed: int = 0) -> list[str]:
    """`n` generated stories, one paragraph each (deterministic from `seed`)."""
    return list(story_corpus(n, seed=seed))


def write_stories(path: Path, n: int, seed: int = 0, separator: str = "\n") -> Path:
    """Write `n` generated stories to `path`, joined by `separator` ("\\n\\n" for blank-line mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(separator.join(stories(n, seed)) + "\n", encoding="utf-8")
    return path

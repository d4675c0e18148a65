"""Each benchmark owns one marked section of docs/benchmarks.md and rewrites only that section."""

from __future__ import annotations

from pathlib import Path

HEADER = (
    "# Benchmarks\n\nWhat each benchmark measures, its goals, whether the recorded run meets them, and how to "
    "rerun it.\n"
)


def replace_section(doc: Path, begin: str, end: str, section: str) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) in place of the old one, or append it."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text(encoding="utf-8") if doc.exists() else HEADER  # re-read: other benchmarks edit it too
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text, encoding="utf-8")

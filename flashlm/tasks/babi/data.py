"""bAbI data: the file format, questions, data location, and the prefix-LM examples built from them.

`parse_babi` reads a task file into `Question`s (each with the statements of its story before it);
`find_data` / `task_file` / `read_task` locate and read the 1k files. `source_text` and `target_text`
frame a question as a prefix-LM example: with supporting facts the target is the chain of supporting
statements, `ANSWER_MARK`, then the answer; qa19's and qa17's chains restate their facts as a walk
(`travel_chain`, `relation_chain`, on the task's `Compass`). The task as a whole: `flashlm.tasks.babi`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from flashlm.errors import DataError
from flashlm.tasks.babi_config import TASKS
from flashlm.training.finetune import Example, make_example

FAILED_BELOW = 0.95  # bAbI convention: a task "fails" under 95% accuracy
DATA_SUBDIR = "shared/data/babi-en-1k"
ANSWER_MARK = "="  # with supporting facts: the answer follows it
# qa19 path finding states "the A is DIRECTION of the B" and asks "How do you go from the X to the Y?"
# ("s,e": the first letters of the directions walked). qa17 positional reasoning states "the A is
# RELATION the B" (above, to the right of, ...) and asks "Is the X RELATION the Y?" (yes or no). Both
# chains walk the supporting statements from X to Y (`travel_chain`, `relation_chain`); qa19's stories are
# also augmented by turning and mirroring their compass (`turn_map`).
PATH_TASK = 19
RELATION_TASK = 17
_ROUTE = re.compile(r"from the (\w+) to the (\w+)", re.IGNORECASE)


@dataclass(frozen=True)
class Compass:
    """A task's four directions, clockwise (a quarter-turn or mirror of every one keeps a story
    consistent; the opposite of each is two steps round), and how its statements phrase them."""

    directions: tuple[str, str, str, str]
    template: str  # a statement: "The {A} is {direction} ... the {B}."

    @cached_property
    def statement(self) -> re.Pattern:
        """The template as a pattern: (A, DIRECTION, B) in its groups."""
        words = self.template.replace("{0}", "(.+?)").replace("{2}", "(.+?)").rstrip(".")
        pattern = words.replace("{1}", "(" + "|".join(self.directions) + ")")
        return re.compile(f"^{pattern}\\.?$", re.IGNORECASE)

    def parse(self, text: str) -> tuple[str, str, str] | None:
        """(A, DIRECTION, B) of a statement, lower-cased; None for any other statement."""
        found = self.statement.match(text.strip())
        return tuple(part.lower() for part in found.groups()) if found else None

    def opposite(self, direction: str) -> str:
        return self.directions[(self.directions.index(direction) + 2) % 4]

    def walk(self, statements: Sequence[str], start: str | None) -> list[tuple[str, str, str]] | None:
        """``statements`` as a path from ``start``: each step (HERE, DIRECTION, NEXT), turned round (as its
        converse) where the statement names NEXT first; None where they do not form such a path."""
        left = [self.parse(text) for text in statements]
        if start is None or None in left:
            return None
        here, path = start, []
        while left:
            step = next((k for k, (a, _, b) in enumerate(left) if here in (a, b)), None)
            if step is None:
                return None
            a, direction, b = left.pop(step)
            if a != here:
                a, direction, b = b, self.opposite(direction), a
            path.append((a, direction, b))
            here = b
        return path

    def turned(self, direction: str, turn: int, mirror: bool) -> str:
        i = self.directions.index(direction)
        return self.directions[((-i if mirror else i) + turn) % 4]


PATHS = Compass(("north", "east", "south", "west"), "The {0} is {1} of the {2}.")
RELATIONS = Compass(("above", "to the right of", "below", "to the left of"), "The {0} is {1} the {2}.")
_ASKED = re.compile(rf"^is the (.+?) (?:{'|'.join(RELATIONS.directions)}) the (.+?)\?$", re.IGNORECASE)


@dataclass(frozen=True)
class Question:
    """One bAbI question with the statements of its story that precede it."""

    task: int
    story: tuple[str, ...]
    question: str
    answer: str
    supporting: tuple[int, ...]  # indices into `story`


# ---- parsing ------------------------------------------------------------------------------------
def parse_babi(lines: Iterable[str], task: int = 0) -> list[Question]:
    """Questions of a bAbI file's lines; a story restarts whenever the line ID is 1."""
    questions: list[Question] = []
    story: list[str] = []
    index: dict[int, int] = {}  # line ID → position in `story`
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        head, _, text = line.partition(" ")
        if not head.isdigit():
            raise DataError(f"line {number}: expected 'ID text', got {line[:40]!r}")
        line_id = int(head)
        if line_id == 1:
            story, index = [], {}
        if "\t" not in text:
            index[line_id] = len(story)
            story.append(text.strip())
            continue
        parts = text.split("\t")
        if len(parts) < 2:
            raise DataError(f"line {number}: a question needs 'question<TAB>answer'")
        support = tuple(index[int(i)] for i in parts[2].split() if int(i) in index) if len(parts) > 2 else ()
        questions.append(Question(task, tuple(story), parts[0].strip(), parts[1].strip(), support))
    return questions


def task_file(data_dir: str | os.PathLike, task: int, split: str) -> Path:
    """``qa{task}_*_{split}.txt`` in ``data_dir``."""
    hits = sorted(Path(data_dir).glob(f"qa{task}_*_{split}.txt"))
    if not hits:
        raise DataError(f"no bAbI file qa{task}_*_{split}.txt in {data_dir}")
    return hits[0]


def find_data(path: str | os.PathLike | None = None) -> Path:
    """The bAbI directory: ``path``, else $FLASHLM_BABI, else ``shared/data/babi-en-1k`` next to the
    working directory or to this checkout."""
    here = Path(__file__).resolve().parents[4]
    candidates = (
        [path]
        if path
        else [
            os.environ.get("FLASHLM_BABI"),
            Path.cwd().parent / DATA_SUBDIR,
            Path.cwd() / DATA_SUBDIR,
            here / DATA_SUBDIR,
        ]
    )
    for candidate in candidates:
        if candidate and any(Path(candidate).glob("qa1_*_train.txt")):
            return Path(candidate)
    raise DataError(
        f"no bAbI data found ({path or 'looked in $FLASHLM_BABI and ' + DATA_SUBDIR}); "
        "pass --data DIR holding qa1_..._train.txt etc."
    )


def read_task(data_dir: str | os.PathLike, task: int, split: str, limit: int | None = None) -> list[Question]:
    with open(task_file(data_dir, task, split), encoding="utf-8") as f:
        questions = parse_babi(f, task)
    return questions[:limit] if limit is not None else questions


# ---- examples -----------------------------------------------------------------------------------
def source_text(q: Question, max_sentences: int) -> str:
    """The last ``max_sentences`` statements and the question, lower-cased."""
    facts = q.story[-max_sentences:] if max_sentences > 0 else ()
    return " ".join((*facts, q.question)).lower()


def target_text(q: Question, max_sentences: int = 0, facts: bool = False) -> str:
    """What the model writes (a leading space keeps whole-word tokens): the answer, or with ``facts``
    the supporting statements that are among the last ``max_sentences``, then `ANSWER_MARK` and the answer."""
    if not facts:
        return " " + q.answer.lower()
    first = max(len(q.story) - max_sentences, 0)
    chain = [q.story[i] for i in q.supporting if i >= first] if max_sentences > 0 else []
    if q.task == PATH_TASK:
        chain = travel_chain(chain, q.question)
    elif q.task == RELATION_TASK:
        chain = relation_chain(chain, q.question)
    return " " + " ".join((*chain, ANSWER_MARK, q.answer)).lower()


def answer_of(written: str) -> str:
    """The answer in what the model wrote: all of it, or what follows the first `ANSWER_MARK` (up to
    another one, should the model run on past its answer; statements never contain the mark)."""
    chain, mark, rest = written.partition(ANSWER_MARK)
    return rest.partition(ANSWER_MARK)[0] if mark else chain


def normalize(answer: str) -> str:
    return re.sub(r"\s+", "", answer.lower())


def build_examples(
    tokenizer: Any, questions: Sequence[Question], max_sentences: int, max_len: int, facts: bool = False
) -> list[Example]:
    return [
        make_example(tokenizer, source_text(q, max_sentences), target_text(q, max_sentences, facts), max_len)
        for q in questions
    ]


def travel_chain(statements: Sequence[str], question: str) -> list[str]:
    """qa19's supporting statements as a walk from where the route starts, each restated (as its
    converse where needed) as "from the HERE the NEXT is DIRECTION.", so the answer is the directions
    in order. Both places sit just before the direction: the model writes it with both in view, and
    learns it far sooner than from the statements copied or stated as "the NEXT is DIRECTION of the
    HERE" (see docs/notes/babi.md). Statements that do not form such a walk are left as they are."""
    route = _ROUTE.search(question)
    walk = PATHS.walk(statements, route.group(1).lower() if route else None)
    if walk is None:
        return list(statements)
    return [restated(PATH_TASK, step) for step in walk]


def relation_chain(statements: Sequence[str], question: str) -> list[str]:
    """qa17's supporting statements as a walk from the question's first object to its second, each
    restated (as its converse where needed) as "the HERE is RELATION the NEXT.": the answer is then
    whether the asked relation is among the walk's. Statements that do not form such a walk are left as they are."""
    asked = _ASKED.match(question.strip())
    walk = RELATIONS.walk(statements, asked.group(1).lower() if asked else None)
    if walk is None:
        return list(statements)
    return [restated(RELATION_TASK, step) for step in walk]


def restated(task: int, step: tuple[str, str, str]) -> str:
    """One (HERE, DIRECTION, NEXT) step of a walk as its chain states it (qa19 or qa17)."""
    here, direction, there = step
    if task == PATH_TASK:
        return f"from the {here} the {there} is {PATHS.opposite(direction)}."
    return f"the {here} is {direction} the {there}."


def corpus(questions: Iterable[Question], max_sentences: int, facts: bool = False) -> Iterable[str]:
    """Training text for the tokenizer: every source and target."""
    for q in questions:
        yield source_text(q, max_sentences) + target_text(q, max_sentences, facts)


__all__ = [
    "ANSWER_MARK",
    "DATA_SUBDIR",
    "FAILED_BELOW",
    "PATHS",
    "PATH_TASK",
    "RELATIONS",
    "RELATION_TASK",
    "TASKS",
    "Compass",
    "Question",
    "answer_of",
    "build_examples",
    "corpus",
    "find_data",
    "normalize",
    "parse_babi",
    "read_task",
    "relation_chain",
    "restated",
    "source_text",
    "target_text",
    "task_file",
    "travel_chain",
]

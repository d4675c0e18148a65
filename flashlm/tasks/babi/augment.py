"""bAbI training augmentation: entity renaming, verb rewording and (qa19) compass turning.

Every training batch renames the people, places, objects, animals, colours and shapes of its stories
(one random permutation of each entity class, within the task's own cast: `task_entities`,
`entity_renaming`, `rename`), rewords each statement with a random synonymous verb (`reword`) and, for
qa19, turns and mirrors the compass (`turn_map`); `augmenting_collate` does it all in a `fit` collate.
Why, and what it buys: the `flashlm.tasks.babi` docstring and docs/notes/babi.md.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from flashlm.tasks.babi.data import PATH_TASK, PATHS, Question, build_examples
from flashlm.training.finetune import collate_prefix

# Interchangeable entities of the bAbI worlds: renaming one consistently keeps a question correct.
# People are renamed within their gender, so "he" and "she" still point where they did.
WOMEN = ("mary", "sandra", "julie", "lily", "gertrude", "emily", "winona", "jessica")
MEN = (
    "daniel",
    "john",
    "fred",
    "bill",
    "jeff",
    "julius",
    "greg",
    "brian",
    "bernhard",
    "jason",
    "antoine",
    "sumit",
    "yann",
)
PLACES = ("kitchen", "bedroom", "office", "garden", "hallway", "bathroom", "school", "park", "cinema")
OBJECTS = ("football", "apple", "milk")
ANIMALS = ("sheep", "cat", "mouse", "wolf", "frog", "lion", "swan", "rhino")  # qa15, qa16
COLORS = ("white", "gray", "yellow", "green", "red", "pink", "blue")  # qa16, qa17
SHAPES = ("square", "rectangle", "triangle", "sphere")  # qa17
ENTITY_CLASSES = (WOMEN, MEN, PLACES, OBJECTS, ANIMALS, COLORS, SHAPES)
# Plural forms in the stories ("cats are afraid of wolves"): renamed with their singular, to the new
# name's plural, or to the new name itself where it has none (as "sheep" serves for both).
PLURALS = {"cat": "cats", "mouse": "mice", "wolf": "wolves"}
# Verbs the bAbI generator picks among at random: any one of a class says the same.
VERB_SYNONYMS = (
    ("went", "went back", "moved", "journeyed", "travelled"),
    ("picked up", "got", "took", "grabbed"),
    ("dropped", "discarded", "put down", "left"),
    ("passed", "handed", "gave"),
)
_VERB_CLASS = {verb: names for names in VERB_SYNONYMS for verb in names}
# Longest first, so "went back" wins over "went"; "left of" (qa17, qa19) is a place, not a verb.
_VERB = re.compile(r"\b(" + "|".join(sorted(_VERB_CLASS, key=len, reverse=True)) + r")\b(?! of)", re.IGNORECASE)
KEEP_PLACES_AND_OBJECTS = frozenset({20})  # qa20 asks why someone went somewhere / took something


_WORD = re.compile(r"[A-Za-z]+")


def task_entities(questions: Iterable[Question]) -> dict[int, list[tuple[str, ...]]]:
    """Per task, the entity classes as they occur in `questions` (a task keeps its own cast)."""
    words: dict[int, set[str]] = {}
    singular = {plural: name for name, plural in PLURALS.items()}
    for q in questions:
        text = " ".join((*q.story, q.question, q.answer)).lower()
        words.setdefault(q.task, set()).update(singular.get(w, w) for w in _WORD.findall(text))
    out = {}
    for task, seen in words.items():
        classes = ENTITY_CLASSES[:2] if task in KEEP_PLACES_AND_OBJECTS else ENTITY_CLASSES
        out[task] = [kept for names in classes if len(kept := tuple(n for n in names if n in seen)) > 1]
    return out


def entity_renaming(rng: np.random.Generator, classes: Sequence[tuple[str, ...]]) -> dict[str, str]:
    """A random renaming: one permutation of each entity class (plural forms follow their singular)."""
    renaming = {old: str(new) for names in classes for old, new in zip(names, rng.permutation(names), strict=True)}
    plurals = {PLURALS[old]: PLURALS.get(new, new) for old, new in renaming.items() if old in PLURALS}
    return renaming | plurals


def rename(q: Question, renaming: dict[str, str]) -> Question:
    """`q` with every entity word renamed (whole words, case-insensitive, capitals kept)."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = renaming.get(word.lower())
        if new is None:
            return word
        return new.capitalize() if word[0].isupper() else new

    sub = lambda text: _WORD.sub(swap, text)
    return Question(q.task, tuple(sub(s) for s in q.story), sub(q.question), sub(q.answer), q.supporting)


def reword(q: Question, rng: np.random.Generator) -> Question:
    """`q` with every verb of `VERB_SYNONYMS` in its story replaced by a random synonym, each on its own
    (a supporting statement in the target is copied from the story, so it matches)."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        names = _VERB_CLASS[word.lower()]
        new = names[int(rng.integers(len(names)))]
        return new.capitalize() if word[0].isupper() else new

    return Question(q.task, tuple(_VERB.sub(swap, s) for s in q.story), q.question, q.answer, q.supporting)


def turn_map(q: Question, rng: np.random.Generator) -> Question:
    """qa19's `q` with its compass turned by a random quarter-turn and mirrored at random (in story and
    answer alike), and each statement stated as its converse at random ("the kitchen is north of the
    office" ≡ "the office is south of the kitchen"). qa17 does not get it: the same treatment of its
    relations lowered its accuracy, with and without its chain (see docs/notes/babi.md)."""
    turn, mirror = int(rng.integers(4)), bool(rng.integers(2))
    story = []
    for text in q.story:
        parsed = PATHS.parse(text)
        if parsed is None:
            story.append(text)
            continue
        there, direction, base = parsed[0], PATHS.turned(parsed[1], turn, mirror), parsed[2]
        if rng.random() < 0.5:
            there, direction, base = base, PATHS.opposite(direction), there
        story.append(PATHS.template.format(there, direction, base))
    by_letter = {d[0]: d for d in PATHS.directions}
    answer = ",".join(
        PATHS.turned(by_letter[a], turn, mirror)[0] if a in by_letter else a for a in q.answer.lower().split(",")
    )
    return Question(q.task, tuple(story), q.question, answer, q.supporting)


def augmenting_collate(
    tokenizer: Any, questions: Sequence[Question], max_sentences: int, max_len: int, seed: int, facts: bool = False
):
    """A `fit` collate over `questions`: renames each one's entities at random (within its task's
    cast), rewords its verbs, frames it and pads the batch. One generator seeded by `seed`: a run is reproducible."""
    rng = np.random.default_rng([seed, zlib.crc32(b"babi-augment")])
    cast = task_entities(questions)

    def collate(batch: Sequence[Question]) -> Any:
        renamed = [reword(rename(q, entity_renaming(rng, cast[q.task])), rng) for q in batch]
        renamed = [turn_map(q, rng) if q.task == PATH_TASK else q for q in renamed]
        examples = build_examples(tokenizer, renamed, max_sentences, max_len, facts)
        return collate_prefix(examples, tokenizer.pad_id or 0)

    return collate


__all__ = [
    "ANIMALS",
    "COLORS",
    "ENTITY_CLASSES",
    "KEEP_PLACES_AND_OBJECTS",
    "MEN",
    "OBJECTS",
    "PLACES",
    "PLURALS",
    "SHAPES",
    "VERB_SYNONYMS",
    "WOMEN",
    "augmenting_collate",
    "entity_renaming",
    "rename",
    "reword",
    "task_entities",
    "turn_map",
]

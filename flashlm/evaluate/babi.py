"""bAbI question answering (Weston et al. 2015): parse, fine-tune with prefix-LM batches, score.

File format: ``ID text`` lines; a question line is ``ID question<TAB>answer<TAB>supporting IDs``;
the ID restarts at 1 with every new story. Each question becomes one example: the story so far
(its statements only, earlier questions left out, at most the last ``max_sentences`` of them, as
End-to-End Memory Networks keep 50) plus the question as the bidirectional source, the answer as the
causal target. Text is lower-cased (names appear in both cases in task 20) and answers are compared
lower-cased after stripping spaces; predictions come from a beam search (``beam``, 4 by default; 1 is
greedy).

With ``supporting_facts`` (the default) the target first repeats the statements bAbI marks as
supporting the answer, in the file's order (the order of the reasoning), then ``= answer``: the
training files' supporting-fact labels become a scratchpad, so a multi-hop question is learnt as a
chain of single lookups. This is bAbI's strongly supervised setting (as MemNN's, not MemN2N's); at
test time the model writes its own chain and only the answer after the ``=`` is scored. With
``copy_statements`` (the default) that chain may only cite statements of its story, whole (`ChainGrammar`;
qa17 and qa19 cite them restated as steps of a walk, either way round): a memory network's choice
among its memories, made here by a beam search under the model's own probabilities. Greedy, the model
often writes a statement the story does not hold ("brian is a swan" where Brian is a lion); beam
search over whole citations instead ranks every real statement by how likely the model finds it.

With ``augment`` (the default), every training batch renames the people, places, objects, animals,
colours and shapes of its stories: one random permutation of each entity class, applied to story,
question and answer alike, and rewords each statement with a random one of bAbI's synonymous verbs
("went", "moved", "journeyed", ...; "got", "took", ...). Renaming alone leaves each story's sequence of
verbs and phrasings as a fingerprint the model memorises (its accuracy on the training questions then
runs far ahead of test; see docs/notes/babi.md); with rewording the two agree and the time goes into the rule.
The renamed question is as correct as the original (bAbI states every fact it asks about), so a
1k training set yields a fresh story at every step and the model cannot memorise who went where;
task 20 keeps its places and objects, whose meaning it asks about (hungry → kitchen). Task 19 (path
finding) also turns and mirrors its compass and states facts as their converses at random, and its
chain restates each fact along the route ("from the kitchen the office is south."; `travel_chain`).
Task 17 (positional reasoning) likewise restates its two supporting statements as a walk from the
asked object to the other ("the pink rectangle is below the triangle. ..."; `relation_chain`).
"""

from __future__ import annotations

import os
import re
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from flashlm.config import ModelConfig
from flashlm.errors import ConfigError, DataError
from flashlm.model.transformer import FlashLM
from flashlm.train.finetune import (
    Example,
    FinetuneConfig,
    collate_prefix,
    finetune,
    greedy_decode,
    length_batches,
    make_example,
    new_model,
    prompt_ids,
)

TASKS = tuple(range(1, 21))
FAILED_BELOW = 0.95  # bAbI convention: a task "fails" under 95% accuracy
DATA_SUBDIR = "shared/data/babi-en-1k"

# From scratch over a word-level BPE vocabulary: the long-range recipe (flashlm.evaluate.longrange),
# a local layer with a 6-token window (a sentence: it binds each place to its subject) under a global
# layer with an effectively infinite RoPE base (content lookup), init_std 0.1. All-global models, and
# deeper ones, sit on a plateau where they only ever answer with the last place named; this layout learns
# the binding instead (see docs/notes/babi.md).
DEFAULT_MODEL = ModelConfig(
    vocab_size=512,
    d_model=128,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    d_ff=384,
    layer_pattern="LG",
    sliding_window=6,
    rope_base_global=1e30,
    init_std=0.1,
    max_seq_len=512,
)


# Interchangeable entities of the bAbI worlds: renaming one consistently keeps a question correct.
# People are renamed within their gender, so "he" and "she" still point where they did.
WOMEN = ("mary", "sandra", "julie", "lily", "gertrude", "emily", "winona", "jessica")
MEN = ("daniel", "john", "fred", "bill", "jeff", "julius", "greg", "brian", "bernhard", "jason", "antoine",
       "sumit", "yann")
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
# With per_task: tasks that share one model, trained on their union with their time pooled. qa2 and
# qa3 track the same people and objects, so one model learns both from their joint data and pooled time
# (see docs/notes/babi.md).
TASK_GROUPS = ((2, 3),)
# Per task on several workers, the order the models start in. Tasks that converge and stop early go
# first, so the time they leave unused flows to the models after them (`next_budget`); those that train
# to the end of their budget go last, so no worker idles long before the deadline, and the shared qa2/qa3
# model and the full-budget tasks train longer than in task order. The last one, qa16, gains little from
# more time, so it gets what is left before the deadline (see docs/notes/babi.md).
SCHEDULE = (20, 15, 4, 1, 6, 9, 12, 5, 18, 11, 10, 7, 8, 13, 19, 2, 3, 17, 14, 16)
KEEP_PLACES_AND_OBJECTS = frozenset({20})  # qa20 asks why someone went somewhere / took something
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


@dataclass
class BabiConfig:
    """How `run_babi` builds, trains and scores the model."""

    tasks: Sequence[int] = TASKS
    per_task: bool = False  # one model per task instead of one joint model
    groups: Sequence[Sequence[int]] = TASK_GROUPS  # with per_task: tasks that share a model
    max_sentences: int = 50
    vocab_size: int = 1024
    model: ModelConfig | str = field(default_factory=lambda: DEFAULT_MODEL)
    finetune: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(
            epochs=200, batch_size=16, lr=3e-3, warmup_steps=100, bucket=32, stop_loss=0.01, stop_windows=10
        )
    )
    supporting_facts: bool = True  # the target lists the supporting statements before the answer
    beam: int = 4  # test-time beam search rows (1: greedy)
    copy_statements: bool = True  # with supporting_facts: chains may only cite the story (`ChainGrammar`)
    augment: bool = True  # rename people/places/objects at every training step (see the module docstring)
    train_limit: int | None = None  # questions per task (subsets for quick runs)
    test_limit: int | None = None
    eval_batch_size: int = 64
    device: str = "cpu"  # where a fresh model is built
    jobs: int = 1  # per task: worker processes training tasks side by side
    threads: int | None = None  # torch threads in all (per task with jobs: shared by the workers)


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
    here = Path(__file__).resolve().parents[3]
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
    answer = ",".join(PATHS.turned(by_letter[a], turn, mirror)[0] if a in by_letter else a
                      for a in q.answer.lower().split(","))
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


def corpus(questions: Iterable[Question], max_sentences: int, facts: bool = False) -> Iterable[str]:
    """Training text for the tokenizer: every source and target."""
    for q in questions:
        yield source_text(q, max_sentences) + target_text(q, max_sentences, facts)


# ---- scoring ------------------------------------------------------------------------------------
class ChainGrammar:
    """What a supporting-fact chain may say: whole statements of its story (token ids, each as the
    target spells it), at least one and in any order, then `ANSWER_MARK`, after which anything goes.
    (Without "at least one", beam search fills up with short "= yes" / "= no" guesses that finish
    before any real chain does, and beam search then answers worse than greedy decoding.)

    `allowed` walks a token trie; it is the constraint of `predict`'s statement-copying decoding,
    the memory-selection of a memory network put as a decoding rule: the model still chooses which
    statements to cite and what to answer, but cannot cite one the story does not hold."""

    _END, _MARK = -1, -2  # trie keys: a statement / the mark ends here

    def __init__(self, statements: Iterable[Sequence[int]], mark: Sequence[int]) -> None:
        self.root: dict[int, dict] = {}
        for ids, end in [*((ids, self._END) for ids in statements), (mark, self._MARK)]:
            node = self.root
            for tok in ids:
                node = node.setdefault(tok, {})
            node[end] = {}
        self._first_mark = mark[0] if any(t != mark[0] for t in self.root) else None  # None: no statements

    def allowed(self, history: Sequence[int]) -> list[int] | None:
        """The tokens that may follow ``history`` (None: any, the chain is over)."""
        if not history and self._first_mark is not None:
            return [t for t in self.root if t >= 0 and t != self._first_mark]
        node = self.root
        for tok in history:
            if tok not in node and self._END in node:
                node = self.root  # a statement ended: the next one starts
            if tok not in node:
                return None  # off the grammar (cannot happen when it constrained `history`)
            node = node[tok]
            if self._MARK in node:
                return None
        ids = [t for t in node if t >= 0]
        return ids + [t for t in self.root if t >= 0] if self._END in node else ids


def citable(q: Question, max_sentences: int) -> list[str]:
    """What ``q``'s chain may cite: its last ``max_sentences`` statements, lower-cased; for qa17 and
    qa19, whose chains restate facts as steps of a walk, each fact restated both ways round."""
    facts = [f.lower() for f in q.story[-max_sentences:]] if max_sentences > 0 else []
    if q.task not in (PATH_TASK, RELATION_TASK):
        return facts
    compass = PATHS if q.task == PATH_TASK else RELATIONS
    out = []
    for fact in facts:
        step = compass.parse(fact)
        if step is None:
            out.append(fact)
            continue
        a, direction, b = step
        out += [restated(q.task, (a, direction, b)), restated(q.task, (b, compass.opposite(direction), a))]
    return out


def chain_grammar(tokenizer: Any, q: Question, max_sentences: int) -> ChainGrammar:
    """The `ChainGrammar` of ``q``'s target: it cites `citable` statements."""
    cites = [tokenizer.encode(" " + c) for c in citable(q, max_sentences)]
    return ChainGrammar(cites, tokenizer.encode(" " + ANSWER_MARK))


def predict(
    model: FlashLM,
    tokenizer: Any,
    sources: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 8,
    beam: int = 1,
    grammars: Sequence[ChainGrammar] | None = None,
) -> list[str]:
    """Prefix-LM answers to ``<bos> source <sep>`` prompts (a long story loses its start): greedy, or
    a beam search of ``beam`` rows whose chains follow ``grammars`` (one per source)."""
    from flashlm.evaluate.translate import beam_search

    limit = model.cfg.max_seq_len - max_new_tokens - 2
    prompts = [prompt_ids(tokenizer, s, limit, keep="end") for s in sources]
    pad = tokenizer.pad_id or 0
    if beam == 1 and grammars is None:
        outputs = greedy_decode(model, prompts, max_new_tokens, tokenizer.eos_id, pad, batch_size)
    else:
        outputs = [[] for _ in prompts]
        for rows in length_batches(prompts, max(batch_size // beam, 1)):
            rules = [grammars[i] for i in rows] if grammars is not None else None

            def allowed(source: int, history: list[int], rules: list | None = rules) -> list[int] | None:
                return rules[source].allowed(history) if rules is not None else None

            found = beam_search(model, [prompts[i] for i in rows], beam, max_new_tokens, tokenizer.eos_id, pad,
                                length_penalty=0.0, allowed=allowed)
            for i, tokens in zip(rows, found, strict=True):
                outputs[i] = tokens
    return [tokenizer.decode(out).strip() for out in outputs]


def score(predictions: Sequence[str], questions: Sequence[Question]) -> dict[int, float]:
    """Exact-match accuracy per task."""
    hits: dict[int, list[bool]] = {}
    for pred, q in zip(predictions, questions, strict=True):
        hits.setdefault(q.task, []).append(normalize(answer_of(pred)) == normalize(q.answer))
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}


def evaluate(
    model: FlashLM,
    tokenizer: Any,
    questions: Sequence[Question],
    max_sentences: int,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    beam: int = 1,
    copy_statements: bool = False,
) -> dict[int, float]:
    """Accuracy per task; with ``copy_statements`` the chains may only cite the story (`ChainGrammar`)."""
    sources = [source_text(q, max_sentences) for q in questions]
    grammars = [chain_grammar(tokenizer, q, max_sentences) for q in questions] if copy_statements else None
    return score(predict(model, tokenizer, sources, batch_size, max_new_tokens, beam, grammars), questions)


# ---- the task -----------------------------------------------------------------------------------
def train_model(
    train: Sequence[Question], cfg: BabiConfig, model: FlashLM | None = None, tokenizer: Any = None
) -> tuple[FlashLM, Any, dict[str, Any]]:
    """Fine-tune ``model`` (or a new one with a tokenizer trained on ``train``) on ``train``."""
    facts = cfg.supporting_facts
    if model is None:
        text = corpus(train, cfg.max_sentences, facts)
        model, tokenizer = new_model(text, cfg.model, cfg.vocab_size, cfg.finetune.seed, cfg.device)
    max_len = model.cfg.max_seq_len
    examples = build_examples(tokenizer, train, cfg.max_sentences, max_len, facts)
    if cfg.augment:
        collate = augmenting_collate(tokenizer, train, cfg.max_sentences, max_len, cfg.finetune.seed, facts)
        summary = finetune(model, list(train), cfg.finetune, collate, [len(e.ids) for e in examples])
    else:
        summary = finetune(model, examples, cfg.finetune)
    summary["examples"] = len(examples)
    summary["longest_target"] = max(len(e.ids) - e.prefix_len for e in examples)  # tokens, with <eos>
    return model, tokenizer, summary


def run_babi(
    data_dir: str | os.PathLike,
    cfg: BabiConfig,
    model: FlashLM | None = None,
    tokenizer: Any = None,
    save_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fine-tune (jointly or per task) and score every task in ``cfg.tasks`` on its test file.

    Per task with ``cfg.jobs`` > 1, that many worker processes train tasks side by side, each on
    ``cfg.threads // cfg.jobs`` threads, and the time budget is shared out as tasks finish (see
    `next_budget`). ``save_dir`` keeps the fine-tuned model and tokenizer (per task: ``qaN`` each).
    """
    began = time.perf_counter()
    groups = task_groups(cfg.tasks, cfg.groups) if cfg.per_task else [list(cfg.tasks)]
    work = [(data_dir, cfg, g, model, tokenizer, _save_path(save_dir, g, cfg.per_task)) for g in groups]
    if cfg.per_task and cfg.jobs > 1 and len(groups) > 1:
        order = sorted(range(len(groups)), key=lambda i: scheduled(groups[i]))
        finished = dict(zip(order, _run_parallel([work[i] for i in order], cfg), strict=True))
        outcomes = [finished[i] for i in range(len(groups))]
    else:
        minutes = cfg.finetune.max_minutes
        outcomes = [train_and_score(*w, minutes=minutes * len(g) / len(cfg.tasks) if minutes else None)
                    for w, g in zip(work, groups, strict=True)]
    accuracy = {t: a for o in outcomes for t, a in o["accuracy"].items()}
    runs = [o["run"] for o in outcomes]
    return _results(accuracy, runs, outcomes[-1], time.perf_counter() - began)


def train_and_score(
    data_dir: str | os.PathLike,
    cfg: BabiConfig,
    group: Sequence[int],
    model: FlashLM | None,
    tokenizer: Any,
    save_path: Path | None,
    minutes: float | None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train on the tasks of ``group`` for at most ``minutes`` and score them on their test files."""
    import copy
    from dataclasses import replace

    import torch

    if threads:
        torch.set_num_threads(threads)
    train = [q for t in group for q in read_task(data_dir, t, "train", cfg.train_limit)]
    test = [q for t in group for q in read_task(data_dir, t, "test", cfg.test_limit)]
    cfg = replace(cfg, finetune=replace(cfg.finetune, max_minutes=minutes))
    start = copy.deepcopy(model) if model is not None else None
    net, tok, summary = train_model(train, cfg, start, tokenizer)
    written = summary["longest_target"] + 2  # what decoding must allow, with some slack
    copy = cfg.copy_statements and cfg.supporting_facts
    accuracy = evaluate(net, tok, test, cfg.max_sentences, cfg.eval_batch_size, written, cfg.beam, copy)
    if save_path is not None:
        net.save_pretrained(save_path, tok)
    run = {k: v for k, v in summary.items() if k != "history"} | {"tasks": list(group), "budget_minutes": minutes}
    return {"accuracy": accuracy, "run": run, "history": summary["history"],
            "parameters": net.num_parameters(), "model_config": net.cfg.to_dict()}


def task_groups(tasks: Sequence[int], groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """`tasks` split into the models that train them: each of `groups` (its members among `tasks`) at
    its first member's place, every other task alone."""
    out, placed = [], set()
    for task in tasks:
        if task in placed:
            continue
        group = next(([t for t in g if t in tasks] for g in groups if task in g), [task])
        placed.update(group)
        out.append(group)
    return out


def scheduled(group: Sequence[int]) -> tuple[int, int]:
    """Sort key of a model's tasks in `SCHEDULE` (its first member's place; unlisted tasks last)."""
    first = group[0]
    return (SCHEDULE.index(first), first) if first in SCHEDULE else (len(SCHEDULE), first)


def parse_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """``"2,3;7,8"`` → ((2, 3), (7, 8)); ``"none"`` or "" → (). Tasks must be 1-20, each in one group."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        groups = tuple(tuple(int(t) for t in g.split(",") if t.strip()) for g in text.split(";") if g.strip())
    except ValueError:
        raise ConfigError(f"--groups {text!r}: expected task numbers like '2,3' or '2,3;7,8' (or 'none')") from None
    members = [t for g in groups for t in g]
    if any(t not in TASKS for t in members) or len(set(members)) != len(members):
        raise ConfigError(f"--groups {text!r}: tasks must be 1-20 and each in at most one group")
    return groups


def next_budget(
    seconds_left: float, jobs: int, running_left: Sequence[float], waiting: Sequence[int], overhead: float = 0.0
) -> float:
    """Training seconds for the next model to start: the workers' time still unclaimed, less each
    unfinished model's ``overhead`` (start-up, tokenizer, scoring), shared by the ``waiting`` models in
    proportion to their tasks (``waiting``: tasks per model, the next one first). ``running_left``
    holds what the running models may still train; one that ends early (its loss converged) thereby
    hands its rest to those after it. A model trains on one worker, so it never gets more than the
    time left to the deadline (less its own overhead)."""
    free = seconds_left * jobs - sum(max(r, 0.0) for r in running_left)
    free -= overhead * (len(waiting) + len(running_left))
    share = free * (waiting[0] if waiting else 1) / max(sum(waiting), 1)
    return max(min(share, seconds_left - overhead), 1.0)


def _run_parallel(work: list[tuple], cfg: BabiConfig) -> list[dict[str, Any]]:
    """`train_and_score` over ``work`` in ``cfg.jobs`` spawned processes, in order of submission."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    jobs = min(cfg.jobs, len(work))
    threads = max(1, (cfg.threads or os.cpu_count() or 1) // jobs)
    minutes = cfg.finetune.max_minutes
    deadline = time.perf_counter() + minutes * 60 if minutes else None
    running: dict[Any, tuple[int, float, float]] = {}  # future → (index, started, budget seconds)
    outcomes: dict[int, dict[str, Any]] = {}
    overheads: list[float] = []  # per finished task: wall seconds not spent training
    queue = list(range(len(work)))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while queue or running:
            while queue and len(running) < jobs:
                index, now = queue.pop(0), time.perf_counter()
                budget = None
                if deadline is not None:
                    left = [b - (now - s) for _, s, b in running.values()]
                    overhead = sum(overheads) / len(overheads) if overheads else 0.0
                    sizes = [len(work[i][2]) for i in (index, *queue)]
                    budget = next_budget(deadline - now, jobs, left, sizes, overhead)
                future = pool.submit(train_and_score, *work[index], budget / 60 if budget else None, threads)
                running[future] = (index, now, budget or 0.0)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                index, started, _ = running.pop(future)
                outcomes[index] = future.result()
                overheads.append(time.perf_counter() - started - outcomes[index]["run"]["seconds"])
    return [outcomes[i] for i in range(len(work))]


def _save_path(save_dir: str | os.PathLike | None, group: Sequence[int], per_task: bool) -> Path | None:
    if save_dir is None:
        return None
    return Path(save_dir) / f"qa{group[0]}" if per_task else Path(save_dir)


def _results(
    accuracy: dict[int, float], runs: list[dict[str, Any]], last: dict[str, Any], seconds: float
) -> dict[str, Any]:
    mean = sum(accuracy.values()) / len(accuracy)
    return {
        "mean_accuracy": mean,
        "accuracy": {str(t): a for t, a in accuracy.items()},
        "failed_tasks": sum(a < FAILED_BELOW for a in accuracy.values()),
        "train_seconds": sum(r["seconds"] for r in runs),
        "total_seconds": seconds,
        "parameters": last["parameters"],
        "model_config": last["model_config"],
        "runs": runs,
        "loss_history": last["history"],
    }


def markdown(results: dict[str, Any]) -> str:
    """The report section: per-task accuracy, the mean and the time."""
    from flashlm.evaluate.report import table

    rows = [(f"qa{t}", a) for t, a in results["accuracy"].items()]
    rows.append(("mean", results["mean_accuracy"]))
    head = (
        f"Mean accuracy {100 * results['mean_accuracy']:.1f}% over {len(results['accuracy'])} tasks, "
        f"{results['failed_tasks']} under 95%; training {results['train_seconds'] / 60:.1f} min, "
        f"total {results['total_seconds'] / 60:.1f} min."
    )
    return head + "\n\n" + table(("task", "accuracy"), rows)


def _register() -> None:
    from flashlm.evaluate.report import SECTIONS

    SECTIONS.setdefault("babi", markdown)


_register()

__all__ = [
    "DEFAULT_MODEL",
    "TASKS",
    "BabiConfig",
    "Question",
    "augmenting_collate",
    "build_examples",
    "entity_renaming",
    "evaluate",
    "find_data",
    "markdown",
    "parse_babi",
    "parse_groups",
    "predict",
    "read_task",
    "rename",
    "reword",
    "run_babi",
    "score",
    "source_text",
    "task_entities",
    "task_file",
    "task_groups",
    "target_text",
    "train_model",
    "relation_chain",
    "travel_chain",
    "turn_map",
]

"""The project's own generated corpus: short stories from a small, consistent "story world".

Each story has a hero, a friend, a place and an object that stay the same from sentence to
sentence (pronouns agree with the character), and follows a plot: setting, discovery, a problem
and its matching solution, an ending. Optional sentences and a second episode vary the length
(about 5 to 16 sentences). So a tiny model can learn the language, and next-sentence prediction is
learnable: a true continuation talks about the same characters and object, a random one does not.
Everything is drawn from ``random.Random(seed)``: the same seed gives the same corpus.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

# name -> (kind, subject pronoun, object pronoun, possessive)
CHARACTERS = {
    **{n: ("girl", "she", "her", "her") for n in ("Lily", "Mia", "Sara", "Anna", "Zoe", "Emma", "Lucy")},
    **{n: ("boy", "he", "him", "his") for n in ("Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Finn")},
    **{n: ("dog", "he", "him", "his") for n in ("Rex", "Buddy", "Spot")},
    **{n: ("cat", "she", "her", "her") for n in ("Kitty", "Luna", "Misty")},
    **{n: ("bird", "he", "him", "his") for n in ("Pip", "Tweety")},
}
TRAITS = ("brave", "curious", "kind", "shy", "happy", "clever", "little", "friendly", "sleepy")
PLACES = {  # place -> a spot in it where things can be found
    "the park": "a big bench",
    "the forest": "an old tree",
    "the beach": "a pile of shells",
    "the garden": "the red flowers",
    "the barn": "a heap of hay",
    "the lake": "a flat rock",
    "the hill": "a tall bush",
    "the market": "a fruit stand",
    "the school": "a wooden desk",
}
OBJECTS = ("ball", "kite", "box", "hat", "book", "key", "shell", "drum", "boat", "map", "bell", "cup")
COLORS = ("red", "blue", "green", "yellow", "shiny", "tiny", "golden", "striped", "old", "soft")
TIMES = ("One day", "One sunny morning", "Early one morning", "One windy afternoon", "Last summer")
FEELINGS = {"good": ("happy", "proud", "excited", "glad"), "bad": ("sad", "worried", "scared", "upset")}
# problem -> (what happens, how they fix it); {o} object, {f} friend, {place} place
PLOTS = (
    ("The wind blew the {o} up into a tall tree.", "{f} found a long stick and got the {o} down."),
    ("The {o} fell into a deep puddle.", "{f} reached in with a net and pulled the {o} out."),
    (
        "Then the {o} rolled away and got lost.",
        "They looked everywhere, and {f} found the {o} behind a rock.",
    ),
    (
        "Then {f} wanted the {o} too, and they began to argue.",
        "They decided to share the {o} and take turns.",
    ),
    ("Oh no, the {o} broke into two pieces!", "{f} brought some glue, and they fixed the {o} together."),
    ("A big goose grabbed the {o} and ran across {place}.", "{f} threw some bread, and the goose let go."),
)
MORALS = (
    "friends help each other",
    "sharing makes everyone happy",
    "it is good to be patient",
    "you should never give up",
    "working together makes hard things easy",
    "being kind is important",
)


def story_corpus(n_docs: int, seed: int = 0) -> Iterator[str]:
    """Yield ``n_docs`` stories (one paragraph each, no newlines), deterministic from ``seed``."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield _story(rng)


def write_story_corpus(path: str | os.PathLike, n_docs: int, seed: int = 0) -> Path:
    """Write ``n_docs`` stories to ``path``, one a line (read it with ``txt_mode="line"``)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for story in story_corpus(n_docs, seed):
            fh.write(story + "\n")
    tmp.replace(out)
    return out


def _story(rng: random.Random) -> str:
    hero, friend = rng.sample(sorted(CHARACTERS), 2)
    kind, he, him, his = CHARACTERS[hero]
    f_kind = CHARACTERS[friend][0]
    place = rng.choice(sorted(PLACES))
    obj = f"{rng.choice(COLORS)} {rng.choice(OBJECTS)}"
    trait = rng.choice(TRAITS)
    s = [
        rng.choice(
            (
                f"Once upon a time, there was a {trait} {kind} named {hero}.",
                f"{hero} was a {trait} {kind} who loved to play outside.",
                f"There once was a {kind} called {hero}, and {he} was very {trait}.",
            )
        ),
    ]
    if rng.random() < 0.5:
        s.append(f"{hero} had a good friend, a {f_kind} named {friend}.")
    s += _episode(rng, hero, friend, place, obj, again=False)
    if rng.random() < 0.35:  # a second episode with the same characters and object
        place2 = rng.choice(sorted(set(PLACES) - {place}))
        s.append(f"The next day, {hero} took the {obj.split()[-1]} to {place2}.")
        s += _episode(rng, hero, friend, place2, obj, again=True)
    s.append(
        rng.choice(
            (
                f"{hero} and {friend} played with the {obj.split()[-1]} until the sun went down.",
                f"That night, {hero} put the {obj.split()[-1]} next to {his} bed and smiled.",
                f"{hero} hugged {friend}, and they walked home together.",
            )
        )
    )
    if rng.random() < 0.6:
        s.append(f"{hero} learned that {rng.choice(MORALS)}.")
    if rng.random() < 0.3:
        s.append(f"{friend} was happy to have a friend like {him}.")
    return " ".join(s)


def _episode(rng: random.Random, hero: str, friend: str, place: str, obj: str, again: bool) -> list[str]:
    he, him = CHARACTERS[hero][1:3]
    f_he = CHARACTERS[friend][1]
    noun = obj.split()[-1]
    problem, fix = rng.choice(PLOTS)
    s = []
    if not again:
        s.append(f"{rng.choice(TIMES)}, {hero} went to {place}.")
        if rng.random() < 0.5:
            s.append(f"The sky was {rng.choice(('blue', 'grey', 'bright', 'cloudy'))} and the air was fresh.")
        s.append(f"Near {PLACES[place]}, {he} found a {obj}.")
        s.append(
            rng.choice(
                (
                    f"{hero} picked up the {noun} and felt {rng.choice(FEELINGS['good'])}.",
                    f'"What a nice {noun}!" said {hero}.',
                    f"{he.capitalize()} had never seen such a {obj} before.",
                )
            )
        )
        s.append(f'Soon {friend} came by and asked, "Can I see your {noun}?"')
    s.append(problem.format(o=noun, f=friend, place=place))
    s.append(f"{hero} felt {rng.choice(FEELINGS['bad'])}.")
    if rng.random() < 0.5:
        s.append(f'"Do not worry," said {friend}. "I will help you."')
    s.append(fix.format(o=noun, f=friend, place=place))
    if rng.random() < 0.5:
        s.append(f"{hero} thanked {friend}, and {f_he} said it was fun to help {him}.")
    return s


__all__ = ["story_corpus", "write_story_corpus"]

"""The project's own generated corpus: short stories from a small, consistent "story world".

Each story has a hero, a friend, a grown-up, a place and an object that stay the same from sentence to
sentence (pronouns agree with the character). A story is one or two episodes drawn from several plot
kinds (a found object that gets into trouble, an animal that needs help, baking with a grown-up, a
race, a change in the weather, a fear overcome), told with dialogue, feelings and small details, and
framed by an opening and an ending. Stories run from about 6 to 25 sentences over a vocabulary of a
few thousand words, so a tiny model has something to learn and a larger one learns more; and
next-sentence prediction is learnable: a true continuation talks about the same characters and
object, a random one does not. Everything is drawn from ``random.Random(seed)``: the same seed gives
the same corpus.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

_GIRLS = ("Lily", "Mia", "Sara", "Anna", "Zoe", "Emma", "Lucy", "Ella", "Ruby", "Nora", "Ivy", "Hana", "Maya")
_BOYS = ("Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Finn", "Omar", "Theo", "Noah", "Eli", "Kai", "Ravi")
_ANIMALS = {  # kind -> names (pronoun by the first letter's parity keeps both genders in each kind)
    "dog": ("Rex", "Buddy", "Spot"),
    "cat": ("Kitty", "Luna", "Misty"),
    "bird": ("Pip", "Tweety"),
    "rabbit": ("Hops", "Clover"),
    "bear": ("Bruno", "Honey"),
    "fox": ("Rusty", "Amber"),
    "duck": ("Waddles", "Daisy"),
    "mouse": ("Nibbles", "Pearl"),
    "frog": ("Ribbit", "Lulu"),
}
_HE, _SHE = ("he", "him", "his"), ("she", "her", "her")
# name -> (kind, subject pronoun, object pronoun, possessive)
CHARACTERS = {
    **{n: ("girl", *_SHE) for n in _GIRLS},
    **{n: ("boy", *_HE) for n in _BOYS},
    **{n: (kind, *(_SHE if i % 2 else _HE)) for kind, names in _ANIMALS.items() for i, n in enumerate(names)},
}
GROWN_UPS = {"Mom": _SHE, "Dad": _HE, "Grandma": _SHE, "Grandpa": _HE, "Aunt Rose": _SHE, "Uncle Joe": _HE}
TRAITS = (
    "brave",
    "curious",
    "kind",
    "shy",
    "happy",
    "clever",
    "little",
    "friendly",
    "sleepy",
    "funny",
    "gentle",
    "busy",
    "cheerful",
    "careful",
    "silly",
    "quiet",
    "bold",
    "playful",
)
PLACES = {  # place -> (a spot in it, something seen there, a sound heard there)
    "the park": ("a big bench", "children on the swings", "the squeak of the swings"),
    "the forest": ("an old tree", "tall pine trees", "birds singing in the branches"),
    "the beach": ("a pile of shells", "waves rolling onto the sand", "the splash of the waves"),
    "the garden": ("the red flowers", "bees buzzing around the roses", "the hum of the bees"),
    "the barn": ("a heap of hay", "cows eating their breakfast", "a rooster crowing"),
    "the lake": ("a flat rock", "ducks swimming in a row", "frogs croaking by the water"),
    "the hill": ("a tall bush", "the whole town far below", "the wind whistling in the grass"),
    "the market": ("a fruit stand", "baskets full of apples and pears", "people laughing and talking"),
    "the school": ("a wooden desk", "bright pictures on the walls", "the bell ringing"),
    "the river": ("a mossy stone", "a little boat drifting by", "the water bubbling over stones"),
    "the zoo": ("the monkey house", "a giraffe eating leaves", "a lion roaring far away"),
    "the library": ("a cozy corner", "shelves full of books", "pages turning softly"),
    "the playground": ("the big slide", "a sandbox full of toys", "children shouting and running"),
    "the meadow": ("a patch of daisies", "butterflies dancing over the grass", "crickets chirping"),
}
OBJECTS = (
    "ball",
    "kite",
    "box",
    "hat",
    "book",
    "key",
    "shell",
    "drum",
    "boat",
    "map",
    "bell",
    "cup",
    "scarf",
    "lamp",
    "marble",
    "flute",
    "basket",
    "ribbon",
    "compass",
    "teddy bear",
    "crayon",
    "puzzle",
    "umbrella",
    "whistle",
    "feather",
    "sticker",
    "jar",
    "ring",
)
COLORS = (
    "red",
    "blue",
    "green",
    "yellow",
    "shiny",
    "tiny",
    "golden",
    "striped",
    "old",
    "soft",
    "purple",
    "silver",
    "spotted",
    "bright",
    "pink",
    "orange",
    "little",
    "wooden",
)
ACTIVITIES = (
    "skipped along the path",
    "picked some flowers",
    "looked for pretty stones",
    "hummed a little song",
    "watched the clouds drift by",
    "counted the birds",
    "drew pictures in the dirt with a stick",
    "jumped over the puddles",
    "chased a butterfly",
    "sat in the shade",
    "waved at the neighbors",
    "collected leaves of every color",
    "played hide and seek",
    "built a tower of sticks",
)
TIMES = (
    "One day",
    "One sunny morning",
    "Early one morning",
    "One windy afternoon",
    "Last summer",
    "On a cold winter day",
    "One rainy Saturday",
    "After school one day",
    "On the first day of spring",
    "One quiet evening",
)
FEELINGS = {
    "good": ("happy", "proud", "excited", "glad", "thankful", "calm", "cheerful", "delighted"),
    "bad": ("sad", "worried", "scared", "upset", "nervous", "grumpy", "lonely", "confused"),
}
SAY = ("said", "asked", "shouted", "whispered", "called", "cried", "laughed", "replied")
FOODS = {
    "cookies": True,
    "a cake": False,
    "muffins": True,
    "bread": False,
    "pancakes": True,
    "a pie": False,
    "soup": False,
    "lemonade": False,
}  # what they make -> whether it is plural
INGREDIENTS = ("flour", "sugar", "eggs", "milk", "butter", "honey", "berries", "apples", "carrots", "cheese")
MORALS = (
    "friends help each other",
    "sharing makes everyone happy",
    "it is good to be patient",
    "you should never give up",
    "working together makes hard things easy",
    "being kind is important",
    "it is okay to ask for help",
    "trying new things can be fun",
    "saying sorry makes things right",
    "being brave means trying even when you are scared",
    "every creature needs a friend",
)

# problem -> (what happens, how they fix it); {o} object, {f} friend, {place} place
TROUBLES = (
    ("The wind blew the {o} up into a tall tree.", "{f} found a long stick and got the {o} down."),
    ("The {o} fell into a deep puddle.", "{f} reached in with a net and pulled the {o} out."),
    ("Then the {o} rolled away and got lost.", "They looked everywhere, and {f} found the {o} behind a rock."),
    ("Then {f} wanted the {o} too, and they began to argue.", "They decided to share the {o} and take turns."),
    ("Oh no, the {o} broke into two pieces!", "{f} brought some glue, and they fixed the {o} together."),
    ("A big goose grabbed the {o} and ran across {place}.", "{f} threw some bread, and the goose let go."),
    ("A naughty monkey snatched the {o} and climbed a pole.", "{f} offered it a banana, and it dropped the {o}."),
    ("The {o} slipped out of a pocket and fell between two boards.", "{f} used a bent spoon to lift the {o} up."),
)


@dataclass
class Cast:
    """Who a story is about; the pronouns follow from the names."""

    hero: str
    friend: str
    adult: str
    place: str
    obj: str  # with its adjective, e.g. "golden key"

    @property
    def noun(self) -> str:
        return self.obj.split(" ", 1)[1]

    def pro(self, who: str, case: int) -> str:
        """A character's pronoun: case 0 subject, 1 object, 2 possessive."""
        return (GROWN_UPS[who] if who in GROWN_UPS else CHARACTERS[who][1:])[case]


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
    c = Cast(
        hero,
        friend,
        rng.choice(sorted(GROWN_UPS)),
        rng.choice(sorted(PLACES)),
        f"{rng.choice(COLORS)} {rng.choice(OBJECTS)}",
    )
    kind, he = CHARACTERS[hero][0], c.pro(hero, 0)
    trait = rng.choice(TRAITS)
    s = [
        rng.choice(
            (
                f"Once upon a time, there was a {trait} {kind} named {hero}.",
                f"{hero} was a {trait} {kind} who loved to play outside.",
                f"There once was a {kind} called {hero}, and {he} was very {trait}.",
                f"In a small town lived a {trait} {kind} named {hero}.",
            )
        )
    ]
    if rng.random() < 0.5:
        s.append(f"{hero} had a good friend, a {CHARACTERS[friend][0]} named {friend}.")
    if rng.random() < 0.3:
        s.append(f"{hero} lived with {c.adult} in a little house near {c.place}.")
    first = rng.choice(EPISODES)
    if first is not _found_object:
        s.append(
            rng.choice(
                (
                    f"{hero} had a {c.obj} that {he} took everywhere.",
                    f"{c.pro(hero, 2).capitalize()} favorite thing was a {c.obj} from {c.adult}.",
                )
            )
        )
    s += first(rng, c, False)
    if rng.random() < 0.4:  # a second episode with the same characters
        c.place = rng.choice(sorted(set(PLACES) - {c.place}))
        s.append(
            rng.choice(
                (
                    f"The next day, {hero} and {friend} went to {c.place}.",
                    f"A few days later, {hero} took the {c.noun} to {c.place}.",
                )
            )
        )
        s += rng.choice([e for e in EPISODES if e is not first])(rng, c, True)
    s.append(
        rng.choice(
            (
                f"{hero} and {friend} played with the {c.noun} until the sun went down.",
                f"That night, {hero} put the {c.noun} next to {c.pro(hero, 2)} bed and smiled.",
                f"{hero} hugged {friend}, and they walked home together.",
                f"When they got home, {c.adult} made them warm milk, and {hero} told {c.pro(c.adult, 1)} everything.",
            )
        )
    )
    if rng.random() < 0.6:
        s.append(f"{hero} learned that {rng.choice(MORALS)}.")
    if rng.random() < 0.3:
        s.append(f"{friend} was happy to have a friend like {c.pro(hero, 1)}.")
    return " ".join(s)


def _arrive(rng: random.Random, c: Cast) -> list[str]:
    spot, sight, sound = PLACES[c.place]
    s = [f"{rng.choice(TIMES)}, {c.hero} went to {c.place}."]
    he = c.pro(c.hero, 0).capitalize()
    sky = rng.choice(("blue", "grey", "bright", "cloudy", "pink", "clear", "stormy", "golden"))
    air = rng.choice(("fresh", "warm", "cool", "chilly", "sweet", "still", "crisp"))
    details = (
        f"{he} saw {sight}.",
        f"{he} could hear {sound}.",
        f"The sky was {sky} and the air was {air}.",
        f"{he} {rng.choice(ACTIVITIES)} for a while.",
    )
    return s + rng.sample(details, rng.randint(0, 3))


def _found_object(rng: random.Random, c: Cast, again: bool) -> list[str]:
    hero, friend, noun = c.hero, c.friend, c.noun
    s = (
        []
        if again
        else _arrive(rng, c)
        + [
            f"Near {PLACES[c.place][0]}, {c.pro(hero, 0)} found a {c.obj}.",
            rng.choice(
                (
                    f"{hero} picked up the {noun} and felt {rng.choice(FEELINGS['good'])}.",
                    f'"What a nice {noun}!" {rng.choice(SAY[:3])} {hero}.',
                    f"{c.pro(hero, 0).capitalize()} had never seen such a {c.obj} before.",
                )
            ),
            f'Soon {friend} came by and asked, "Can I see your {noun}?"',
        ]
    )
    trouble, fix = rng.choice(TROUBLES)
    s.append(trouble.format(o=noun, f=friend, place=c.place))
    s.append(f"{hero} felt {rng.choice(FEELINGS['bad'])}.")
    if rng.random() < 0.5:
        s.append(f'"Do not worry," said {friend}. "I will help you."')
    s.append(fix.format(o=noun, f=friend, place=c.place))
    if rng.random() < 0.5:
        s.append(f"{hero} thanked {friend}, and {c.pro(friend, 0)} said it was fun to help {c.pro(hero, 1)}.")
    return s


def _animal_in_need(rng: random.Random, c: Cast, again: bool) -> list[str]:
    hero, friend = c.hero, c.friend
    animal = rng.choice(("a baby bird", "a little kitten", "a lost puppy", "a tiny turtle", "a small squirrel"))
    where = rng.choice(("stuck in a bush", "crying under a bench", "caught in an old net", "alone by the path"))
    s = [] if again else _arrive(rng, c)
    s += [
        f"There {c.pro(hero, 0)} found {animal} {where}.",
        f'"Poor thing," {rng.choice(SAY[:4])} {hero}. "We have to help it."',
    ]
    if rng.random() < 0.6:
        s.append(f'{friend} looked worried. "What if it is hurt?" {c.pro(friend, 0)} asked.')
    s += [
        f"{hero} and {friend} worked together very gently, and soon the animal was free.",
        rng.choice(
            (
                f"They brought it some water and used the {c.noun} to keep it warm.",
                f"They made it a bed out of leaves next to the {c.noun}.",
                f"{c.adult} came to help, wrapped it in a towel and put the {c.noun} beside it.",
            )
        ),
        f"The little animal looked up at {hero} and made a happy sound.",
    ]
    if rng.random() < 0.5:
        s.append(f"{hero} felt {rng.choice(FEELINGS['good'])} and warm inside.")
    return s


def _baking(rng: random.Random, c: Cast, again: bool) -> list[str]:
    hero, friend, adult = c.hero, c.friend, c.adult
    food, a, b = rng.choice(sorted(FOODS)), *rng.sample(INGREDIENTS, 2)
    the_food, were, them = f"the {food.split()[-1]}", *(("were", "them") if FOODS[food] else ("was", "it"))
    s = [
        f'{rng.choice(TIMES)}, {adult} said, "Shall we make {food} today?"',
        f'"Yes, please!" {rng.choice(SAY[:3])} {hero}, and {c.pro(hero, 0)} asked {friend} to come too.',
        f"They put {a} and {b} into a big bowl, and {hero} stirred and stirred.",
    ]
    mishap = rng.random()
    if mishap < 0.4:
        s += [
            f"Oops! {friend} spilled the {a} all over the floor.",
            f'"I am sorry," {c.pro(friend, 0)} said in a small voice.',
            f'{adult} laughed. "It is only {a}. We can clean it up together."',
        ]
    elif mishap < 0.7:
        s += [
            f"They waited and waited, but the oven was too hot, and {the_food} got a little burnt.",
            f"{hero} felt {rng.choice(FEELINGS['bad'])}, but {adult} showed them how to make a new batch.",
        ]
    s += [
        f"At last {the_food} {were} ready, and the whole house smelled sweet.",
        f"They shared {them} with everyone, and {hero} saved a little next to the {c.noun} for later.",
    ]
    return s


def _race(rng: random.Random, c: Cast, again: bool) -> list[str]:
    hero, friend = c.hero, c.friend
    goal = rng.choice(("the old tree", "the big gate", "the red fence", "the top of the hill", "the pond"))
    s = [] if again else _arrive(rng, c)
    s += [
        f'"Let us race to {goal}!" {rng.choice(SAY[:5])} {friend}.',
        f"{hero} and {friend} ran as fast as they could, and the {c.noun} bounced in {c.pro(hero, 2)} bag.",
    ]
    if rng.random() < 0.5:
        s += [
            f"Halfway there, {friend} tripped on a root and fell down.",
            f"{hero} stopped running and went back to help {c.pro(friend, 1)} up.",
            f'"Are you okay?" {c.pro(hero, 0)} asked, and {friend} nodded with a small smile.',
            "They walked the rest of the way together, holding hands.",
        ]
    else:
        winner = rng.choice((hero, friend))
        s += [
            f"{winner} reached {goal} first and cheered.",
            f'"Good race!" said {hero if winner == friend else friend}, and they both laughed.',
        ]
    return s


def _weather(rng: random.Random, c: Cast, again: bool) -> list[str]:
    hero, friend = c.hero, c.friend
    s = [] if again else _arrive(rng, c)
    s += [
        rng.choice(
            (
                "Suddenly, dark clouds filled the sky and it began to rain.",
                "All at once, a strong wind came and the trees began to shake.",
                "Then it started to snow, big soft flakes falling everywhere.",
            )
        ),
        f'"Quick, let us find a place to hide!" {rng.choice(SAY[:5])} {friend}.',
        f"They ran under {PLACES[c.place][0]} and waited, holding the {c.noun} close.",
        f"{hero} felt {rng.choice(FEELINGS['bad'])}, so {friend} told a funny story to make {c.pro(hero, 1)} laugh.",
    ]
    s.append(
        rng.choice(
            (
                "Soon the sun came out, and a bright rainbow stretched across the sky.",
                "After a while the storm passed, and everything sparkled and shone.",
                "When it stopped, they made a little snowman together.",
            )
        )
    )
    return s


def _fear(rng: random.Random, c: Cast, again: bool) -> list[str]:
    hero, friend, adult = c.hero, c.friend, c.adult
    fear, brave = rng.choice(
        (
            ("the dark", "turned off the light and counted the stars through the window"),
            ("the big slide", "climbed up the ladder and slid all the way down"),
            ("the deep water", "held on to the side and kicked {pos} legs"),
            ("the loud thunder", "covered {pos} ears and sang a song until it was quiet"),
            ("the tall ladder", "went up one step at a time"),
        )
    )
    s = [
        f"{hero} was afraid of {fear}.",
        f'"I cannot do it," {c.pro(hero, 0)} {rng.choice(("whispered", "said", "cried"))}.',
        f'{rng.choice((friend, adult))} held {c.pro(hero, 2)} hand and said, "You are braver than you think."',
        f"{hero} took a deep breath, and then {c.pro(hero, 0)} {brave.format(pos=c.pro(hero, 2))}.",
        f'"I did it!" {c.pro(hero, 0)} shouted, and {c.pro(hero, 0)} felt {rng.choice(FEELINGS["good"])}.',
    ]
    s.append(
        rng.choice(
            (
                f"{friend} gave {c.pro(hero, 1)} the {c.obj} as a prize for being so brave.",
                f"Afterwards, {hero} held the {c.noun} tight and could not stop grinning.",
            )
        )
    )
    return s


EPISODES: tuple[Callable[[random.Random, Cast, bool], list[str]], ...] = (
    _found_object,
    _found_object,
    _animal_in_need,
    _baking,
    _race,
    _weather,
    _fear,
)

__all__ = ["CHARACTERS", "story_corpus", "write_story_corpus"]

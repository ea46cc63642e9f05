"""A LIMA-shaped data set for the pretrained stories260K: child-story requests answered by TinyStories-style stories.

Everything here is deterministic (one `random.Random(seed)` per split) and pure Python: no model is run.
Two kinds of response:
  sampled (the default, `small_lima.sample_splits`): `make_plan` writes an opening that names the subject and
      the hero, the base model continues it, `accept_story` filters the samples and `plan_request` phrases
      the request from what the finished story does;
  template (`build_splits`): a story plan (opening, a problem, its resolution, an optional moral, an ending)
      filled with a character, a subject and words that go with it, the request phrased to match it. Such
      stories are a narrow distribution; fine-tuning on them lost 12-36% of the held-out story loss
      (docs/reproducing.md).

Splits (both kinds):
  train      ~1,000 single-turn conversations + ~30 two-turn ones, train subjects and names
  dev        50 prompts (dev.jsonl, prompts only) and the same 50 with reference answers (dev_ref.jsonl,
             for dev-set perplexity): train subjects, fresh combinations
  test       held-out prompts whose subjects and names never occur in train or dev
The held-out *story text* for the knowledge-retained loss is not made here: it is sampled from the base
model itself (`lima_jax.experiments.small_lima`), since a template story would measure the fine-tuning
data's style, not what pretraining taught.
"""
from __future__ import annotations

import dataclasses
import random
import re
import statistics
from typing import Sequence

# (subject, kind): animals act and talk, things are found, lost and played with.
TRAIN_SUBJECTS = (
    ("dog", "animal"), ("cat", "animal"), ("bird", "animal"), ("fish", "animal"), ("frog", "animal"),
    ("duck", "animal"), ("bunny", "animal"), ("bear", "animal"), ("puppy", "animal"), ("kitten", "animal"),
    ("horse", "animal"), ("cow", "animal"), ("pig", "animal"), ("mouse", "animal"), ("bee", "animal"),
    ("butterfly", "animal"), ("sheep", "animal"), ("monkey", "animal"),
    ("ball", "thing"), ("kite", "thing"), ("boat", "thing"), ("car", "thing"), ("train", "thing"),
    ("cake", "thing"), ("hat", "thing"), ("box", "thing"), ("book", "thing"), ("doll", "thing"),
    ("drum", "thing"), ("cup", "thing"), ("shoe", "thing"), ("bike", "thing"), ("flower", "thing"),
    ("tree", "thing"), ("star", "thing"), ("toy", "thing"), ("bed", "thing"), ("key", "thing"),
    ("ring", "thing"), ("sock", "thing"),
)
TEST_SUBJECTS = (
    ("lion", "animal"), ("owl", "animal"), ("turtle", "animal"), ("fox", "animal"), ("snail", "animal"),
    ("truck", "thing"), ("balloon", "thing"), ("shell", "thing"), ("robot", "thing"), ("apple", "thing"),
    ("rocket", "thing"), ("blanket", "thing"), ("crayon", "thing"), ("pumpkin", "thing"),
)
# The sampled data set (`small_lima.sample_splits`) draws from many more subjects, so that training teaches
# the model to copy the request's subject (pieces of an unseen word) rather than to recall one of 40 words.
# Words that are also common verbs or scenery ("watch", "door") are left out: the filter's "names the subject
# again" check would mean little for them.
SAMPLED_TRAIN_SUBJECTS = TRAIN_SUBJECTS + tuple((w, "animal") for w in (
    "rabbit", "squirrel", "elephant", "giraffe", "tiger", "zebra", "chicken", "goat", "deer", "wolf", "ant", "bug",
    "spider", "worm", "dragon", "dinosaur", "penguin", "whale", "dolphin", "shark", "ladybug", "hen", "parrot",
    "lamb", "pony", "snake", "goose", "swan", "eagle", "camel")) + tuple((w, "thing") for w in (
    "plane", "bus", "bucket", "spoon", "chair", "lamp", "clock", "bell", "pencil", "puzzle", "castle", "tent",
    "leaf", "cookie", "pie", "candy", "sandwich", "banana", "carrot", "egg", "basket", "bag", "bottle", "jar",
    "coin", "necklace", "dress", "shirt", "coat", "scarf", "umbrella", "wagon", "sled", "shovel", "rope", "ladder",
    "mirror", "pillow", "bowl", "plate", "boot", "glove", "button", "feather", "crown", "wand", "map", "rainbow",
    "snowman", "flag", "whistle", "guitar", "piano", "trumpet", "phone", "camera", "bracelet", "ribbon", "marble",
    "jacket")) + tuple((w, "animal") for w in (
    "hippo", "panda", "koala", "gorilla", "peacock", "flamingo", "beaver", "raccoon", "hamster", "kitty", "lizard",
    "crab", "jellyfish", "otter", "bat", "rat", "robin", "crow", "pigeon", "toad", "caterpillar", "unicorn",
    "octopus", "crocodile", "cheetah", "leopard", "moose", "donkey", "bull", "calf", "chick", "duckling", "ostrich",
    "squid", "starfish", "dragonfly", "firefly", "beetle", "grasshopper", "cricket", "moth", "hedgehog", "skunk",
    "sloth", "kangaroo", "monster", "fairy")) + tuple((w, "thing") for w in (
    "tractor", "scooter", "skateboard", "helmet", "backpack", "lunchbox", "muffin", "cupcake", "pizza", "cheese",
    "grape", "cherry", "lemon", "strawberry", "peach", "pear", "melon", "watermelon", "tomato", "potato", "seed",
    "acorn", "mushroom", "sunflower", "tulip", "vase", "pot", "kettle", "teapot", "fork", "napkin", "towel",
    "soap", "bubble", "wheel", "airplane", "ship", "submarine", "raft", "canoe", "anchor", "telescope", "lantern",
    "candle", "flashlight", "magnet", "globe", "statue", "fountain", "hut", "cabin", "igloo", "nest",
    "cage", "carpet", "rug", "sofa", "couch", "desk", "shelf", "sweater", "mitten", "sandal", "slipper",
    "belt", "wallet", "purse", "locket", "medal", "trophy", "badge", "sticker", "envelope", "notebook", "marker",
    "eraser", "ruler", "quilt", "gift", "letter", "painting", "hammer", "brush", "stone",
    "pebble", "crystal", "diamond", "treasure", "sandcastle", "tower", "costume", "mask", "cape",
    "toothbrush", "bandage", "puppet", "dollhouse", "flute", "violin", "harp", "radio", "computer",
    "cereal", "noodle", "pancake", "waffle", "donut", "lollipop", "popcorn", "chocolate", "honey", "jam", "bread"))
TRAIN_NAMES = (("Lily", "she"), ("Tim", "he"), ("Ben", "he"), ("Sue", "she"), ("Tom", "he"), ("Anna", "she"),
               ("Sam", "he"), ("Lucy", "she"), ("Jack", "he"), ("Mia", "she"), ("Max", "he"), ("Amy", "she"),
               ("Bob", "he"), ("Sara", "she"), ("Jake", "he"), ("Kim", "she"))
TEST_NAMES = (("Zoe", "she"), ("Leo", "he"), ("Ella", "she"), ("Finn", "he"))
PET_NAMES = ("Spot", "Fluffy", "Buddy", "Daisy", "Coco", "Pip", "Sunny", "Rex")
ADJECTIVES = {"animal": ("little", "happy", "small", "friendly", "big", "silly", "kind"),
              "thing": ("red", "big", "shiny", "little", "blue", "pretty", "new", "yellow")}
PLAYS = {"animal": ("play in the park", "run in the grass", "jump and play", "play in the sun", "look at the sky"),
         "thing": ("play with it", "take it to the park", "show it to {pos} friends", "hold it close",
                   "look at it")}
PLACES = ("in the park", "in the garden", "in the yard", "in the forest", "by the sea", "in a small house")
FRIENDS = (("a girl named Kate", "Kate"), ("a boy named Joe", "Joe"), ("a bird", "the bird"),
           ("a cat", "the cat"), ("a dog", "the dog"), ("{pos} mom", "{pos} mom"), ("{pos} dad", "{pos} dad"))
FEELINGS = ("happy", "glad", "proud")
ENDINGS = ("{Name} was very {feeling}.", "From that day on, {name} and {friend} were best friends.",
           "They played together all day and had lots of fun.", "{Name} smiled and hugged {friend}.",
           "And they all lived happily ever after.", "{Name} went home with a big smile.")
# problem -> (sentences of the problem and its resolution, moral topic, moral sentence)
PROBLEMS = {
    "lost": (["One day, {name} could not find the {s}.", "{P} looked {place} and under the bed.",
              "{P} was very sad.", "Then {friend} helped {obj} look.", "They found the {s} behind a big rock."],
             "never giving up", "{Name} learned that it is good to keep trying and never give up."),
    "share": (["One day, {friend} wanted to play with the {s} too.", "But {name} did not want to share.",
               "{friend_c} was sad and began to cry.", "{Name} felt bad.", "{P} gave the {s} to {friend} and said, "
               "\"We can play together.\""],
              "sharing", "{Name} learned that sharing makes everyone happy."),
    "stuck": (["One day, the {s} got stuck in a tall tree.", "{Name} could not reach it.", "{P} was scared.",
               "Then {friend} came with a long stick.", "Together they got the {s} down."],
              "asking for help", "{Name} learned that it is good to ask for help."),
    "rain": (["One day, dark clouds came and it started to rain.", "The {s} got all wet and cold.",
              "{Name} was worried.", "{P} took the {s} inside and dried it with a soft towel.",
              "Soon the sun came out again."],
             "being kind", "{Name} learned that it is good to take care of the things you love."),
    "broken": (["One day, the {s} fell down and broke.", "{Name} was very sad.",
                "{P} did not know what to do.", "Then {friend} said, \"Let's fix it together.\"",
                "They worked hard and fixed the {s}."],
               "working together", "{Name} learned that working together can fix many things."),
    "brave": (["One night, {name} heard a loud noise near the {s}.", "{P} was afraid of the dark.",
               "But {name} took a deep breath and went to look.", "It was only {friend}, who wanted to say hello.",
               "{Name} laughed and was not afraid anymore."],
              "being brave", "{Name} learned that being brave is not so hard."),
}
ANIMAL_PROBLEMS = {  # an animal subject is the hero itself; {s} is then a thing it loves
    "lost": (["One day, {name} got lost {place}.", "The little {s} looked left and right but could not find the way home.",
              "{P} was very scared.", "Then {friend} came and showed {obj} the way.", "{Name} was home again."],
             "never giving up", "{Name} learned that it is good to keep trying and never give up."),
    "hungry": (["One day, {name} was very hungry.", "The little {s} looked for food {place}, but there was none.",
                "Then {name} saw {friend}, who had some food.", "{friend_c} shared the food with {name}.",
                "They ate together under a big tree."],
               "sharing", "{Name} learned that sharing makes everyone happy."),
    "race": (["One day, {name} wanted to win a race.", "The little {s} ran very fast, but {friend} fell down.",
              "{Name} stopped to help.", "{P} did not win the race.", "But everyone said {name} was very kind."],
             "being kind", "{Name} learned that being kind is better than winning."),
    "brave": (["One night, there was a big storm.", "The little {s} was afraid of the loud noise.",
               "But {name} took a deep breath and stayed close to {friend}.", "Soon the storm was over.",
               "{Name} was not afraid anymore."],
              "being brave", "{Name} learned that being brave is not so hard."),
}
MORAL_TOPICS = sorted({p[1] for p in list(PROBLEMS.values()) + list(ANIMAL_PROBLEMS.values())})


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class Story:
    """One written story and the facts a request can name."""

    sentences: tuple[str, ...]
    subject: str
    name: str  # the hero: a child's name, or the animal's pet name
    problem: str
    moral: str  # the moral topic, "" when the story states no moral
    possessive: str  # the hero's "his" / "her"

    @property
    def text(self) -> str:
        return join_sentences(self.sentences)


def join_sentences(sentences: Sequence[str]) -> str:
    """Sentences as paragraphs of two to three sentences, like TinyStories."""
    paragraphs, current = [], []
    for i, s in enumerate(sentences):
        current.append(s)
        if len(current) == 3 or (i in (0, 1) and len(current) == 2):
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(paragraphs)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def write_story(rng: random.Random, subject: str, kind: str, names: Sequence[tuple[str, str]],
                problem: str | None = None, with_moral: bool | None = None) -> Story:
    """A TinyStories-style story about `subject`: opening, problem, resolution, optional moral, ending."""
    child, pronoun = rng.choice(names)
    obj, pos = ("her", "her") if pronoun == "she" else ("him", "his")
    adj = rng.choice(ADJECTIVES[kind])
    if kind == "animal":
        hero = rng.choice(PET_NAMES)
        pronoun, obj, pos = rng.choice((("he", "him", "his"), ("she", "her", "her")))
        opening = [f"Once upon a time, there was {article(adj)} {adj} {subject} named {hero}.",
                   f"{hero} lived {rng.choice(PLACES)} with {child}.",
                   f"{hero} loved to {rng.choice(PLAYS['animal'])} with {child}."]
        problems = ANIMAL_PROBLEMS
        opening = opening[:1] + rng.sample(opening[1:], 1)
    else:
        hero = child
        opening = [rng.choice((f"Once upon a time, there was a little {'girl' if pronoun == 'she' else 'boy'} "
                               f"named {child}.", f"Once upon a time, {child} had {article(adj)} {adj} {subject}.",
                               f"There was once a child named {child}.")),
                   f"{_cap(pronoun)} loved {pos} {adj} {subject}.",
                   f"Every day, {pronoun} liked to {rng.choice(PLAYS['thing']).format(pos=pos)}."]
        opening = opening[:1] + [rng.choice(opening[1:])]
        problems = PROBLEMS
    problem = problem or rng.choice(sorted(problems))
    body, moral_topic, moral = problems[problem]
    friend_long, friend = rng.choice(FRIENDS)
    friend_long, friend = friend_long.format(pos=pos), friend.format(pos=pos)
    if friend.endswith(f" {subject}"):  # a dog's friend is never "a dog"
        friend_long, friend = "a girl named Kate", "Kate"
    fill = dict(name=hero, Name=hero, s=subject, P=_cap(pronoun), obj=obj, place=rng.choice(PLACES),
                friend=friend, friend_c=_cap(friend), feeling=rng.choice(FEELINGS))
    middle = [s.format(**fill) for s in body]
    first = next((i for i, m in enumerate(middle) if friend in m), None)
    if first is not None:  # introduce the friend where they first appear ("a girl named Kate", then "Kate")
        middle[first] = middle[first].replace(friend, friend_long, 1)
    with_moral = rng.random() < 0.5 if with_moral is None else with_moral
    ending = [rng.choice(ENDINGS).format(**fill)]
    if with_moral:
        ending.append(moral.format(**fill))
    sentences = [_cap(s) for s in opening + middle + ending]
    return Story(tuple(sentences), subject, hero, problem, moral_topic if with_moral else "", pos)


# ----------------------------------------------------------------------------------------------- requests


def story_phrase(story: Story) -> str:
    return f"{article(story.subject)} {story.subject}"


def about_request(rng: random.Random, a: str) -> str:
    """A request for a story about `a` ("a dog"), in one of 12 phrasings."""
    return rng.choice((f"Write a story about {a}.", f"Tell me a story about {a}.",
                       f"Can you write a short story about {a}?", f"Please tell me a story about {a}.",
                       f"I want a story about {a}.", f"Write a bedtime story about {a}.",
                       f"Tell me a story for kids about {a}.", f"Make up a story about {a}.",
                       f"Could you tell me a little story about {a}?", f"My son loves stories. Write one about {a}.",
                       f"Write a happy story about {a}.", f"Once upon a time... Tell me a story about {a}!"))


def named_request(rng: random.Random, a: str, name: str) -> str:
    return rng.choice((f"Write a story about {a} and someone named {name}.", f"Tell me a story about {name} and {a}.",
                       f"Write a story with {a} in it. The main character is {name}."))


def make_request(rng: random.Random, story: Story, kind: str) -> tuple[str, str]:
    """(the user's request, the assistant's answer) for one story, phrased by request `kind`."""
    a = story_phrase(story)
    n = len(story.sentences)
    if kind == "about":
        request = about_request(rng, a)
    elif kind == "named":
        request = named_request(rng, a, story.name)
    elif kind == "moral":
        request = rng.choice((f"Write a story with a moral about {story.moral}. Use {a} in it.",
                              f"Tell me a story about {a} that teaches a lesson about {story.moral}.",
                              f"Write a short story with a moral about {a}."))
    elif kind == "where":
        if story.name in HERO_NAMES:  # a child's story: the event happens to the child or to the thing
            event = {"lost": f"loses {{pos}} {story.subject}", "share": f"does not want to share {{pos}} {story.subject}",
                     "stuck": f"finds {{pos}} {story.subject} stuck in a tree",
                     "rain": f"has to save {{pos}} {story.subject} from the rain",
                     "broken": f"fixes {{pos}} broken {story.subject}",
                     "brave": f"hears a noise near {{pos}} {story.subject} at night"}[story.problem]
            request = f"Write a story where {story.name} {event.format(pos=story.possessive)}."
        else:
            event = {"lost": "gets lost", "hungry": "is very hungry", "race": "runs a race",
                     "brave": "is afraid of a storm"}[story.problem]
            request = rng.choice((f"Write a story where {a} {event}.", f"Tell me a story where {a} {event}."))
    elif kind == "sentences":
        request = rng.choice((f"Write a story in {n} sentences about {a}.", f"Tell me a {n}-sentence story about {a}.",
                              f"Write a story about {a}. Use exactly {n} sentences."))
    elif kind == "continue":
        k = 2 if n > 6 else 1
        start, rest = story.sentences[:k], story.sentences[k:]
        request = rng.choice(("Continue this story: ", "Finish this story: ", "What happens next? ")) + " ".join(start)
        return request, join_sentences(rest)
    else:
        raise ValueError(kind)
    return request, story.text


HERO_NAMES = {n for n, _ in TRAIN_NAMES + TEST_NAMES}
REQUEST_KINDS = ("about", "about", "named", "moral", "where", "sentences", "continue")


@dataclasses.dataclass(frozen=True)
class Example:
    turns: tuple[str, ...]
    subject: str
    kind: str

    def record(self, source: str) -> dict:
        return {"conversations": list(self.turns), "source": source, "subject": self.subject, "kind": self.kind}

    def prompt_record(self, source: str, ident: str) -> dict:
        return {"id": ident, "conversations": [self.turns[0]], "source": source, "subject": self.subject,
                "kind": self.kind}


def make_example(rng: random.Random, subjects: Sequence[tuple[str, str]], names: Sequence[tuple[str, str]],
                 kind: str | None = None) -> Example:
    subject, skind = rng.choice(subjects)
    kind = kind or rng.choice(REQUEST_KINDS)
    story = write_story(rng, subject, skind, names, with_moral=True if kind == "moral" else None)
    request, answer = make_request(rng, story, kind)
    return Example((request, answer), subject, kind)


def make_two_turn(rng: random.Random, subjects: Sequence[tuple[str, str]],
                  names: Sequence[tuple[str, str]]) -> Example:
    """A story, then a follow-up request for another one about a different subject (or a moral added)."""
    first = make_example(rng, subjects, names, "about")
    subject, skind = rng.choice([s for s in subjects if s[0] != first.subject])
    story = write_story(rng, subject, skind, names)
    follow = rng.choice((f"Now tell me another story, about {article(subject)} {subject}.",
                         f"That was nice. Can you write one more about {article(subject)} {subject}?",
                         f"Thank you! Now write a story about {article(subject)} {subject}."))
    return Example(first.turns + (follow, story.text), first.subject, "two_turn")


@dataclasses.dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    test: list[Example]


def build_splits(seed: int = 0, train_size: int = 1000, two_turn: int = 30, dev_size: int = 50,
                 test_size: int = 40) -> Splits:
    """The train/dev/test examples (deterministic in `seed`); test uses unseen subjects and names only."""
    rng = random.Random(seed)
    train = [make_example(rng, TRAIN_SUBJECTS, TRAIN_NAMES) for _ in range(train_size)]
    train += [make_two_turn(rng, TRAIN_SUBJECTS, TRAIN_NAMES) for _ in range(two_turn)]
    seen = {e.turns[0] for e in train}
    dev: list[Example] = []
    dev_rng = random.Random(seed + 1)
    while len(dev) < dev_size:
        e = make_example(dev_rng, TRAIN_SUBJECTS, TRAIN_NAMES)
        if e.turns[0] not in seen:
            seen.add(e.turns[0])
            dev.append(e)
    test_rng = random.Random(seed + 2)
    test = [make_example(test_rng, TEST_SUBJECTS, TEST_NAMES, kind=k)
            for k in (REQUEST_KINDS * test_size)[:test_size]]
    return Splits(train, dev, test)


# ------------------------------------------------------------------------------------------------ measures


def mentions(text: str, subject: str) -> bool:
    """The overlap check: the answer names the subject (singular or plural, whole word, any case)."""
    return re.search(rf"\b{re.escape(subject)}(s|es)?\b", text, re.IGNORECASE) is not None


def copy_contexts(subject: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Contexts for the copy probe (`small_lima.copy_rate`), each ending right before the subject is written
    again: (request, answer opening) pairs, where the answer's first sentence names the request's subject
    the way the training stories do; and plain story text that mentions it and then calls for it again, the
    pretraining format."""
    a, art = f"{article(subject)} {subject}", article(subject)
    chat = [(f"Write a story about {a}.", f"Once upon a time, there was {art}"),
            (f"Tell me a story about {a} that teaches a lesson.", f"Once upon a time, there was {art}"),
            (f"Write a story in 9 sentences about {a}.", f"There was once {art}")]
    plain = [f"Once upon a time, Lily had {a}. She loved her",
             f"Once upon a time, there was a little girl named Lily. She had {a}. One day, Lily lost her"]
    return chat, plain


def diversity(examples: Sequence[Example], tokenize) -> dict:
    """Size and diversity figures of a split: distinct requests, openings, subjects, kinds, lengths."""
    answers = [e.turns[-1] for e in examples]  # a prompt-only split (test): its requests
    lengths = sorted(len(tokenize(a)) for a in answers)
    pct = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return {"conversations": len(examples), "multi_turn": sum(len(e.turns) > 2 for e in examples),
            "distinct_requests": len({e.turns[0] for e in examples}),
            "distinct_answers": len(set(answers)),
            "distinct_openings": len({a.split(".")[0] for a in answers}),
            "distinct_request_openings": len({" ".join(e.turns[0].split()[:3]) for e in examples}),
            "subjects": len({e.subject for e in examples}),
            "kinds": {k: sum(e.kind == k for e in examples) for k in sorted({e.kind for e in examples})},
            "answer_tokens": {"min": lengths[0], "median": statistics.median(lengths), "p99": pct(0.99),
                              "max": lengths[-1]}}


# ------------------------------------------------------------------------------ plans for sampled stories
# The default data set (`small_lima build-data`, responses="sampled"): a templated opening that names the
# hero and the subject (and, half the time, sets up an event), continued by the base model itself; the
# request is phrased from what the finished story does. `small_lima.sample_stories` runs the model and
# `accept_story` filters its samples.

ANIMAL_EVENTS = (("One day, {hero} went to the park.", "goes to the park"),
                 ("One day, {hero} saw a big red ball.", "sees a big red ball"),
                 ("One day, {hero} wanted to fly like a bird.", "wants to fly like a bird"),
                 ("One day, {hero} met a new friend.", "meets a new friend"),
                 ("One day, {hero} got lost in the forest.", "gets lost in the forest"),
                 ("One day, {hero} found a big box.", "finds a big box"),
                 ("One day, {hero} was very hungry.", "is very hungry"),
                 ("One day, it started to rain and {hero} got wet.", "gets wet in the rain"))
THING_EVENTS = (("One day, {hero} lost {pos} {s}.", "loses {pos} {s}"),
                ("One day, {hero} took {pos} {s} to the park.", "takes {pos} {s} to the park"),
                ("One day, {hero}'s {s} broke.", "breaks {pos} {s}"),
                ("One day, {hero} did not want to share {pos} {s}.", "does not want to share {pos} {s}"),
                ("One day, {hero} showed {pos} {s} to a friend.", "shows {pos} {s} to a friend"),
                ("One day, {hero} could not find {pos} {s}.", "cannot find {pos} {s}"))
MORAL_WORDS = re.compile(r"\b(learned|moral|lesson)\b", re.IGNORECASE)
SAMPLED_KINDS = ("about", "about", "named", "moral", "where", "sentences", "continue")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The start of a story for the base model to continue, and the facts a request can name."""

    subject: str
    hero: str  # a child's name, or the animal's pet name
    animal: bool  # the subject is the hero itself
    opening: tuple[str, ...]  # one or two sentences; the first names the hero and the subject
    event: str  # "" or what the second sentence sets up, as a clause: "Spot goes to the park"

    @property
    def text(self) -> str:
        return " ".join(self.opening)


def make_plan(rng: random.Random, subjects: Sequence[tuple[str, str]], names: Sequence[tuple[str, str]],
              with_event: bool | None = None, subject_first: bool = False) -> Plan:
    """A story opening for `subject` (and, half the time or as `with_event` says, an event sentence).
    subject_first: the first sentence names the subject as the request does ("there was a turtle ..."), the
    same way for animals and things; otherwise (the test prompts' openings) a thing comes after its owner and
    an adjective ("Lily had a red ball.")."""
    subject, kind = rng.choice(subjects)
    adj = rng.choice(ADJECTIVES[kind])
    child, pronoun = rng.choice(names)
    pos = "her" if pronoun == "she" else "his"
    a = f"{article(subject)} {subject}"
    if subject_first:
        hero = rng.choice(PET_NAMES) if kind == "animal" else child
        place = rng.choice(PLACES)
        if kind == "animal":
            pos = rng.choice(("his", "her"))
            first = rng.choice((f"Once upon a time, there was {a} named {hero}.",
                                f"Once upon a time, {place}, there lived {a} named {hero}.",
                                f"There was once {a} called {hero}."))
        else:
            child_noun = "girl" if pronoun == "she" else "boy"
            first = rng.choice((f"Once upon a time, there was {a} that belonged to a little {child_noun} named "
                                f"{child}.",
                                f"Once upon a time, {place}, there was {a} that {child} loved.",
                                f"There was once {a}, and it belonged to a child named {child}."))
    elif kind == "animal":
        hero = rng.choice(PET_NAMES)
        pos = rng.choice(("his", "her"))
        first = rng.choice((f"Once upon a time, there was {article(adj)} {adj} {subject} named {hero}.",
                            f"Once upon a time, {rng.choice(PLACES)}, there lived {article(adj)} {adj} {subject} "
                            f"named {hero}.",
                            f"There was once {article(adj)} {adj} {subject} called {hero}."))
    else:
        hero = child
        first = rng.choice((f"Once upon a time, there was a little {'girl' if pronoun == 'she' else 'boy'} named "
                            f"{child}. {_cap(pronoun)} had {article(adj)} {adj} {subject}.",
                            f"Once upon a time, {child} had {article(adj)} {adj} {subject}.",
                            f"There was once a child named {child} who loved {pos} {adj} {subject}."))
    with_event = rng.random() < 0.5 if with_event is None else with_event
    if not with_event:
        return Plan(subject, hero, kind == "animal", (first,), "")
    sentence, clause = rng.choice(ANIMAL_EVENTS if kind == "animal" else THING_EVENTS)
    hero_phrase = f"{a} named {hero}" if kind == "animal" else hero
    return Plan(subject, hero, kind == "animal", (first, sentence.format(hero=hero, pos=pos, s=subject)),
                f"{hero_phrase} {clause.format(pos=pos, s=subject)}")


def split_sentences(text: str) -> list[str]:
    """Sentences: text up to . ! or ? (and a closing quote), then white space or the end."""
    return [s.strip() for s in re.findall(r'.*?[.!?]+["\']?(?=\s|$)', text, re.DOTALL) if s.strip()]


def accept_story(plan: Plan, continuation: str, ended: bool, num_tokens: int, min_tokens: int) -> str:
    """Why a sampled story is refused ("" when it is kept): it must end by itself (the model started a new
    story), be at least `min_tokens` long, stay on its subject (name it again after the opening; an animal
    subject may be named by its pet name instead), end on a sentence end and repeat no sentence."""
    sentences = split_sentences(continuation)
    if not ended:
        return "no_end"
    if num_tokens < min_tokens:
        return "short"
    if not (mentions(continuation, plan.subject) or (plan.animal and re.search(rf"\b{plan.hero}\b", continuation))):
        return "off_subject"
    if not continuation.rstrip().endswith((".", "!", "?", '"')):
        return "no_sentence_end"
    if len(set(sentences)) < len(sentences):
        return "repeats"
    return ""


def plan_request(rng: random.Random, plan: Plan, kind: str, continuation: str | None) -> tuple[str, str | None]:
    """(request, answer) for a story that starts with `plan` and goes on with `continuation` (None: a test
    prompt, no answer). Answers are the whole story, except for "continue", whose prompt holds the opening."""
    a = f"{article(plan.subject)} {plan.subject}"
    story = None if continuation is None else f"{plan.text} {continuation}"
    if kind == "about":
        return about_request(rng, a), story
    if kind == "named":
        return named_request(rng, a, plan.hero), story
    if kind == "moral":
        return rng.choice((f"Write a short story with a moral about {a}.",
                           f"Tell me a story about {a} that teaches a lesson.",
                           f"Write a story about {a} in which someone learns something.")), story
    if kind == "where":
        return rng.choice((f"Write a story where {plan.event}.", f"Tell me a story where {plan.event}.")), story
    if kind == "sentences":
        n = len(split_sentences(story)) if story is not None else rng.randint(8, 14)
        return rng.choice((f"Write a story in {n} sentences about {a}.", f"Tell me a {n}-sentence story about {a}.",
                           f"Write a story about {a}. Use exactly {n} sentences.")), story
    if kind == "continue":
        return rng.choice(("Continue this story: ", "Finish this story: ", "What happens next? ")) + plan.text, \
            continuation
    raise ValueError(kind)


def kinds_for(plan: Plan, continuation: str | None) -> tuple[str, ...]:
    """The request kinds a story supports: "where" needs an event, "moral" a moral in the text."""
    kinds = [k for k in SAMPLED_KINDS if k != "where" or plan.event]
    if continuation is not None and not MORAL_WORDS.search(continuation):
        kinds = [k for k in kinds if k != "moral"]
    return tuple(kinds)

"""The demo's built-in instruction suite: generated, deterministic English tasks with checkable answers (no downloads).

Fourteen task families, ten with a single checkable answer (reverse a list, sort numbers, capitals, plurals,
past tenses, opposites, longest word, counting, arithmetic, word categories) and four open-ended ones with
several valid references (describe an animal, write an invitation, summarise a short story, give tips).
Each family has three training phrasings and two held-out phrasings that keep the task's keywords.

Splits, mirroring how the paper's test sets differ from Dolly (its training distribution):

    train / dev / test   seen families and phrasings, short inputs                    (like Dolly)
    ood_phrasing         seen families, held-out phrasings                             (like SelfInst: new wording)
    ood_long             seen families, longer inputs (6-9 list items, 8-sentence stories), two asks in one
                         question, about twice as long answers                         (like S-NI: long inputs)
    ood_tasks            unseen families composed from seen skills (sort descending,    (like Vicuna: new tasks)
                         country of a capital, what an animal eats, declining an invitation, ...)

Every split is drawn from its own `random.Random` stream, so a split's content depends only on the suite
version, its name and its size. Facts (capitals, plurals, ...) come from a closed list, so a question like
"What is the plural of cat?" would recur across splits by chance; instead every (instruction, input) pair of
the seen families falls by its hash into one of three disjoint pools: test (1/8), dev (1/8) and train (the
rest). `train`, `dev` and `test` draw only from their own pool, so the in-domain test set shares no record with
what the teacher or the students train on, while the facts it asks about still occur in training under other
phrasings (e.g. the capital of France asked as "Name the capital city of France."). `suite_stats` reports the
overlap with the training data (0 for every test split).

Settings are chosen on dev splits only, one per test distribution (`DEV_SPLITS`): `dev` mirrors `test`, and
`dev_phrasing`, `dev_long`, `dev_tasks` are drawn like `ood_phrasing`, `ood_long`, `ood_tasks` from their own
random streams, redrawing every (instruction, input) pair that the test split they mirror holds, so no dev record
is a test record (`suite_stats` reports that overlap too: 0).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

from dwakd.data.records import SECTIONS_NO_INPUT, SECTIONS_WITH_INPUT, build_prompt
from dwakd.demo import words as W

SUITE_VERSION = "3"

Example = tuple[str, str, list[str]]  # (instruction, input, references); the first reference is trained on
Maker = Callable[[random.Random, str, bool], Example]  # (rng, phrasing, long) -> example


@dataclass(frozen=True)
class Family:
    """One task family: training phrasings, held-out phrasings, and a generator of (instruction, input, refs)."""

    name: str
    phrasings: tuple[str, ...]
    held_out: tuple[str, ...]
    make: Maker
    open_ended: bool = False


# ---- helpers -------------------------------------------------------------------------------------------------------
def _words(rng: random.Random, k: int, distinct_lengths: bool = False) -> list[str]:
    """k distinct list words (optionally with pairwise different lengths, so 'longest' has one answer)."""
    while True:
        picked = rng.sample(W.LIST_WORDS, k)
        if not distinct_lengths or len({len(w) for w in picked}) == k:
            return picked


def _n_items(rng: random.Random, long: bool) -> int:
    return rng.randint(6, 9) if long else rng.randint(3, 5)


def _quote(rng: random.Random, word: str) -> str:
    return f'"{word}"' if rng.random() < 0.5 else word


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---- checkable families -------------------------------------------------------------------------------------------
def _reverse(rng: random.Random, phrasing: str, long: bool) -> Example:
    items = _words(rng, _n_items(rng, long))
    return phrasing, ", ".join(items), [", ".join(reversed(items))]


def _sort(rng: random.Random, phrasing: str, long: bool) -> Example:
    numbers = rng.sample(range(1, 1000 if long else 100), _n_items(rng, long))
    return phrasing, ", ".join(map(str, numbers)), [", ".join(map(str, sorted(numbers)))]


def _capital(rng: random.Random, phrasing: str, long: bool) -> Example:
    if long:
        (c1, a1), (c2, a2) = rng.sample(sorted(W.CAPITALS.items()), 2)
        question = f"What are the capitals of {c1} and {c2}?"
        return question, "", [f"The capital of {c1} is {a1}. The capital of {c2} is {a2}."]
    country = rng.choice(sorted(W.CAPITALS))
    return phrasing.format(x=country), "", [f"The capital of {country} is {W.CAPITALS[country]}."]


def _fact(table: dict[str, str], sentence: str, pair: str) -> Maker:
    """A lookup family: one word in the instruction; the long form asks about two words in one question."""

    def make(rng: random.Random, phrasing: str, long: bool) -> Example:
        if long:
            a, b = rng.sample(sorted(table), 2)
            answer = f"{sentence.format(x=a, y=table[a])} {sentence.format(x=b, y=table[b])}"
            return pair.format(a=a, b=b), "", [answer]
        key = rng.choice(sorted(table))
        return phrasing.format(x=_quote(rng, key)), "", [sentence.format(x=key, y=table[key])]

    return make


def _longest(rng: random.Random, phrasing: str, long: bool) -> Example:
    items = _words(rng, _n_items(rng, long), distinct_lengths=True)
    return phrasing, ", ".join(items), [f"The longest word is {max(items, key=len)}."]


def _count(rng: random.Random, phrasing: str, long: bool) -> Example:
    n = rng.randint(7, 10) if long else rng.randint(2, 6)
    items = _words(rng, n)
    return phrasing, ", ".join(items), [f"There are {n} items in the list."]


def _arith(rng: random.Random, phrasing: str, long: bool) -> Example:
    terms = [rng.randint(1, 99) for _ in range(3 if long else 2)]
    expr, total = str(terms[0]), terms[0]
    for t in terms[1:]:
        if rng.random() < 0.5 and total - t >= 0:
            expr, total = f"{expr} - {t}", total - t
        else:
            expr, total = f"{expr} + {t}", total + t
    return phrasing.format(x=expr), "", [f"{expr} = {total}."]


def _category(rng: random.Random, phrasing: str, long: bool) -> Example:
    if long:
        (w1, c1), (w2, c2) = [(rng.choice(W.CATEGORIES[c]), c) for c in rng.sample(sorted(W.CATEGORIES), 2)]
        return f"What kind of things are {w1} and {w2}?", "", [f"{_cap(w1)} is {c1}. {_cap(w2)} is {c2}."]
    category = rng.choice(sorted(W.CATEGORIES))
    word = rng.choice(W.CATEGORIES[category])
    return phrasing.format(x=_quote(rng, word)), "", [f"{_cap(word)} is {category}."]


# ---- open-ended families (several valid references) ---------------------------------------------------------------
def _animal_text(name: str) -> list[str]:
    size, habitat, food, trait = W.ANIMALS[name]
    article = "an" if size[0] in "aeiou" else "a"
    return [f"The {name} is {article} {size} animal that lives in the {habitat}. It eats {food} and is known for "
            f"being {trait}.",
            f"The {name} lives in the {habitat} and eats {food}. It is {article} {size} and {trait} animal."]


def _describe(rng: random.Random, phrasing: str, long: bool) -> Example:
    if long:
        a, b = rng.sample(sorted(W.ANIMALS), 2)
        refs = [f"{x} {y}" for x in _animal_text(a) for y in _animal_text(b)]
        return f"Describe the {a} and the {b}.", "", refs
    name = rng.choice(sorted(W.ANIMALS))
    return phrasing.format(x=name), "", _animal_text(name)


def _invite(rng: random.Random, phrasing: str, long: bool) -> Example:
    name, event, day = rng.choice(W.NAMES), rng.choice(W.EVENTS), rng.choice(W.DAYS)
    if long:
        place, hour, item = rng.choice(W.PLACES), rng.randint(2, 8), rng.choice(W.ITEMS)
        instruction = (f"Invite {name} to a {event} on {day} at {hour} pm near the {place}, and ask them to "
                       f"bring some {item}.")
        refs = [f"Dear {name}, I would like to invite you to my {event} on {day} at {hour} pm near the {place}. "
                f"Could you please bring some {item}? I hope you can come. Best wishes.",
                f"Hi {name}! You are invited to my {event} on {day} at {hour} pm near the {place}. Please bring "
                f"some {item}, and let me know if you can join us."]
        return instruction, "", refs
    refs = [f"Dear {name}, I would like to invite you to my {event} on {day}. I hope you can come. Best wishes.",
            f"Hi {name}! You are invited to my {event} on {day}. Please let me know if you can join us."]
    return phrasing.format(name=name, event=event, day=day), "", refs


def _story(rng: random.Random, long: bool) -> tuple[str, list[str]]:
    name, other = rng.sample(W.NAMES, 2)
    place, place2 = rng.sample(W.PLACES, 2)
    day, (items, items2) = rng.choice(W.DAYS), rng.sample(W.ITEMS, 2)
    n, n2 = rng.randint(2, 9), rng.randint(2, 9)
    text = [f"On {day} morning, {name} went to the {place}.", f"There, {name} bought {n} {items}.",
            f"Near the entrance, a man was {rng.choice(W.PEOPLE_DOING)}.", f"Later, {name} met {other} for tea."]
    refs = [f"{name} went to the {place} on {day} and bought {n} {items}.",
            f"On {day}, {name} bought {n} {items} at the {place}."]
    if long:
        text[3:3] = [f"After that, {name} walked to the {place2}.", f"At the {place2}, {name} bought {n2} {items2}.",
                     f"A woman nearby was {rng.choice(W.PEOPLE_DOING)}."]
        text.append(f"The weather was {rng.choice(['sunny', 'cloudy', 'windy', 'cold', 'warm'])} all day.")
        refs = [f"{name} went to the {place} and the {place2} on {day} and bought {n} {items} and {n2} {items2}.",
                f"On {day}, {name} bought {n} {items} at the {place} and {n2} {items2} at the {place2}."]
    return " ".join(text), refs


def _summarize(rng: random.Random, phrasing: str, long: bool) -> Example:
    text, refs = _story(rng, long)
    return phrasing, text, refs


def _tips(rng: random.Random, phrasing: str, long: bool) -> Example:
    activity = rng.choice(sorted(W.TIPS))
    tips = W.TIPS[activity]
    if long:
        return f"Give four tips for {activity}.", "", ["\n".join(f"{i}. {t}" for i, t in enumerate(tips, 1))]
    pairs = list(permutations(tips, 2))
    first = rng.choice(pairs)
    refs = [f"1. {a}\n2. {b}" for a, b in [first, *(p for p in pairs if p != first)]]
    return phrasing.format(x=activity), "", refs


FAMILIES: tuple[Family, ...] = (
    Family("reverse", ("Reverse the order of these words.", "Write the following words in reverse order.",
                       "List these words backwards, starting with the last one."),
           ("Could you put the words below in reverse order, please?", "Take this list of words and reverse it."),
           _reverse),
    Family("sort", ("Sort these numbers from smallest to largest.", "Put the following numbers in ascending order.",
                    "Arrange these numbers in increasing order."),
           ("Please sort the numbers below, smallest first.", "Order the numbers so that they go from small to large."),
           _sort),
    Family("capital", ("What is the capital of {x}?", "Name the capital city of {x}.",
                       "Which city is the capital of {x}?"),
           ("Tell me the capital of {x}.", "I would like to know the capital city of {x}."), _capital),
    Family("plural", ("What is the plural of {x}?", "Give the plural form of the word {x}.",
                      "Write the plural of {x}."),
           ("How do you write {x} in the plural?", "Turn the noun {x} into its plural."),
           _fact(W.PLURALS, "The plural of {x} is {y}.", "What are the plurals of {a} and {b}?")),
    Family("past", ("What is the past tense of {x}?", "Give the past tense of the verb {x}.",
                    "Write the past tense form of {x}."),
           ("How do you put the verb {x} in the past tense?", "Change {x} into the past tense."),
           _fact(W.PAST_TENSES, "The past tense of {x} is {y}.", "What are the past tenses of {a} and {b}?")),
    Family("opposite", ("What is the opposite of {x}?", "Give a word that means the opposite of {x}.",
                        "Name the opposite of the word {x}."),
           ("Which word has the opposite meaning to {x}?", "Tell me the opposite of {x}."),
           _fact(W.ANTONYMS, "The opposite of {x} is {y}.", "What are the opposites of {a} and {b}?")),
    Family("longest", ("Which word in the list is the longest?", "Find the longest word in this list.",
                       "Name the longest of these words."),
           ("Out of the following words, which one is the longest?", "Pick the longest word from the list below."),
           _longest),
    Family("count", ("How many items are in this list?", "Count the items in the following list.",
                     "Tell me how many items this list contains."),
           ("What is the number of items in the list below?", "Count how many items are listed here."), _count),
    Family("arith", ("What is {x}?", "Calculate {x}.", "Compute {x} and give the result."),
           ("Work out {x}.", "Can you tell me what {x} is?"), _arith),
    Family("category", ("What kind of thing is {x}?", "Which category does {x} belong to?",
                        "Say what kind of thing {x} is."),
           ("Tell me which category the word {x} belongs to.", "Classify {x}: what kind of thing is it?"),
           _category),
    Family("describe", ("Describe the {x} in a few sentences.", "Write a short description of the {x}.",
                        "Tell me about the {x}."),
           ("Give a brief description of the {x}.", "What can you tell me about the {x}?"), _describe, True),
    Family("invite", ("Write a short invitation to {name} for a {event} on {day}.",
                      "Invite {name} to a {event} on {day}.",
                      "Write a message inviting {name} to my {event} on {day}."),
           ("Draft a friendly note that invites {name} to a {event} on {day}.",
            "Please write an invitation for {name}: a {event} on {day}."), _invite, True),
    Family("summarize", ("Summarize the text in one sentence.", "Give a one-sentence summary of this text.",
                         "Sum up the following story in one sentence."),
           ("Write a single sentence that summarizes the story below.", "Summarize what happens here in one sentence."),
           _summarize, True),
    Family("tips", ("Give two tips for {x}.", "What are two good tips for {x}?", "Suggest two tips for {x}."),
           ("Share a couple of tips for {x}.", "I need two tips for {x}."), _tips, True),
)


# ---- unseen families (ood_tasks) -----------------------------------------------------------------------------------
def _sort_desc(rng: random.Random) -> Example:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return ("Sort these numbers from largest to smallest.", ", ".join(map(str, numbers)),
            [", ".join(map(str, sorted(numbers, reverse=True)))])


def _country_of(rng: random.Random) -> Example:
    country = rng.choice(sorted(W.CAPITALS))
    capital = W.CAPITALS[country]
    return f"{capital} is the capital of which country?", "", [f"{capital} is the capital of {country}."]


def _shortest(rng: random.Random) -> Example:
    items = _words(rng, rng.randint(3, 5), distinct_lengths=True)
    return "Which word in the list is the shortest?", ", ".join(items), [f"The shortest word is {min(items, key=len)}."]


def _plural_list(rng: random.Random) -> Example:
    keys = rng.sample(sorted(W.PLURALS), rng.randint(2, 4))
    return "Write these words in the plural.", ", ".join(keys), [", ".join(W.PLURALS[k] for k in keys)]


def _opposite_list(rng: random.Random) -> Example:
    keys = rng.sample(sorted(W.ANTONYMS), rng.randint(2, 4))
    return "Write the opposites of these words.", ", ".join(keys), [", ".join(W.ANTONYMS[k] for k in keys)]


def _animal_food(rng: random.Random) -> Example:
    name = rng.choice(sorted(W.ANIMALS))
    return f"What does the {name} eat?", "", [f"The {name} eats {W.ANIMALS[name][2]}."]


def _animal_home(rng: random.Random) -> Example:
    name = rng.choice(sorted(W.ANIMALS))
    return f"Where does the {name} live?", "", [f"The {name} lives in the {W.ANIMALS[name][1]}."]


def _decline(rng: random.Random) -> Example:
    name, event, day = rng.choice(W.NAMES), rng.choice(W.EVENTS), rng.choice(W.DAYS)
    refs = [f"Dear {name}, thank you for inviting me to your {event} on {day}. I am sorry, but I cannot come. "
            "Best wishes.",
            f"Hi {name}! Thank you for the invitation to your {event} on {day}. Sadly, I cannot join you."]
    return f"Write a short message to {name} saying that I cannot come to the {event} on {day}.", "", refs


UNSEEN_FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "sort_desc": _sort_desc, "country_of": _country_of, "shortest": _shortest, "plural_list": _plural_list,
    "opposite_list": _opposite_list, "animal_food": _animal_food, "animal_home": _animal_home, "decline": _decline,
}

# split name -> (column title in the report, which paper test set it stands in for)
TEST_SPLITS: dict[str, tuple[str, str]] = {
    "test": ("Suite", "in-domain, like Dolly"),
    "ood_phrasing": ("Phrasing", "held-out phrasings of seen tasks, like SelfInst"),
    "ood_long": ("Long", "longer inputs and answers, two asks in one question, like S-NI"),
    "ood_tasks": ("Tasks", "unseen task families composed of seen skills, like Vicuna"),
}

# dev split -> the test split whose distribution it mirrors (the demo's settings are chosen on these only)
DEV_SPLITS: dict[str, str] = {"dev": "test", "dev_phrasing": "ood_phrasing", "dev_long": "ood_long",
                              "dev_tasks": "ood_tasks"}
SPLIT_TITLES: dict[str, str] = {name: title for name, (title, _) in TEST_SPLITS.items()} | {
    "dev": "Dev", "dev_phrasing": "Dev phrasing", "dev_long": "Dev long", "dev_tasks": "Dev tasks"}


# The demo's prompt: the Alpaca template's sections without its preamble sentence ("Below is an instruction that
# describes a task..."). The preamble is the same 25-30 tokens in every example, about 40 % of the demo's ~60-token
# examples, and would cost that share of every training step and evaluation for nothing the demo measures.
def demo_prompt(instruction: str, input_text: str) -> str:
    """The prompt every demo record carries (its `prompt` field, which training and evaluation use as is)."""
    return build_prompt(instruction, input_text, preamble=False)


def _record(family: str, example: Example) -> dict:
    instruction, input_text, refs = example
    output: str | list[str] = refs[0] if len(refs) == 1 else refs
    return {"instruction": instruction, "input": input_text, "prompt": demo_prompt(instruction, input_text),
            "output": output, "family": family}


def _rng(split: str) -> random.Random:
    digest = hashlib.sha256(f"dwakd-demo-suite/{SUITE_VERSION}/{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


POOLS = 8  # hash buckets of an (instruction, input) pair: 0 -> test, 1 -> dev, the rest -> train
_MAX_DRAWS = 10_000
_FRESH_DRAWS = 500


def pool(instruction: str, input_text: str) -> str:
    """Which in-domain split may hold this (instruction, input) pair: "test", "dev" or "train" (by its hash)."""
    bucket = hashlib.sha256(f"{instruction}\x1f{input_text}".encode()).digest()[0] % POOLS
    return {0: "test", 1: "dev"}.get(bucket, "train")


def _key(example: Example | dict) -> tuple[str, str]:
    """The (instruction, input) pair that identifies a question across splits."""
    if isinstance(example, dict):
        return example["instruction"], example["input"]
    return example[0], example[1]


def _draw(rng: random.Random, family: Family, split: str, taken: set[tuple[str, str]],
          excluded: frozenset[tuple[str, str]]) -> Example:
    """One example of a seen family for `split`, redrawn until it falls in that split's pool (train/dev/test)
    and is not `excluded` (the test split a dev split mirrors) and, for dev and test splits, preferably one whose
    (instruction, input) is not yet in the split (families with few distinct questions, like `tips`, repeat one
    once `_FRESH_DRAWS` draws found no new one)."""
    kind = _kind(split)
    for draw in range(_MAX_DRAWS):
        phrasings = family.held_out if kind == "ood_phrasing" else family.phrasings
        example = family.make(rng, rng.choice(phrasings), kind == "ood_long")
        key = _key(example)
        if key in excluded or (split in ("test", *DEV_SPLITS) and key in taken and draw < _FRESH_DRAWS):
            continue
        if kind not in ("train", "dev", "test") or pool(*key) == kind:
            taken.add(key)
            return example
    raise RuntimeError(f"suite family {family.name!r}: no {split} example in {_MAX_DRAWS} draws")


def _kind(split: str) -> str:
    """The distribution a split is drawn from: a mirroring dev split's test split (in-domain `dev` has its own
    pool), otherwise the split itself."""
    return DEV_SPLITS[split] if split in DEV_SPLITS and split != "dev" else split


def generate_split(split: str, size: int, exclude: Sequence[dict] = ()) -> list[dict]:
    """`size` records of one split (train, dev, a test split or a dev split mirroring one), families round-robin.

    `exclude`: records whose (instruction, input) pairs the split must not hold; `build_suite` passes each mirroring
    dev split the test split it mirrors.
    """
    rng = _rng(split)
    kind = _kind(split)
    excluded = frozenset(_key(r) for r in exclude)
    records: list[dict] = []
    if kind == "ood_tasks":
        makers = list(UNSEEN_FAMILIES.items())
        taken: set[tuple[str, str]] = set()
        fresh = split in DEV_SPLITS  # the test split keeps one draw per record; a dev split prefers new questions
        for i in range(size):
            name, make = makers[i % len(makers)]
            for draw in range(_MAX_DRAWS):
                example = make(rng)
                key = _key(example)
                if key in excluded or (fresh and key in taken and draw < _FRESH_DRAWS):
                    continue
                break
            else:
                raise RuntimeError(f"suite family {name!r}: no {split} example in {_MAX_DRAWS} draws")
            taken.add(key)
            records.append(_record(name, example))
        return records
    if kind not in ("train", "dev", *TEST_SPLITS):
        raise ValueError(f"unknown suite split {split!r}")
    taken = set()
    for i in range(size):
        family = FAMILIES[i % len(FAMILIES)]
        records.append(_record(family.name, _draw(rng, family, split, taken, excluded)))
    if split in ("train", "dev"):
        rng.shuffle(records)
    return records


@dataclass(frozen=True)
class SuiteSizes:
    """Records per split; the teacher trains on all of `train`, students on its first `student_train`.

    `dev`: the in-domain dev split; `dev_ood`: each of the dev splits that mirror an out-of-domain test split.
    """

    train: int = 20000
    student_train: int = 2000
    dev: int = 200
    test: int = 100
    dev_ood: int = 100

    def __post_init__(self) -> None:
        if not 0 < self.student_train <= self.train:
            raise ValueError(f"student_train ({self.student_train}) must be in [1, train={self.train}]")


def suite_fingerprint(sizes: SuiteSizes) -> str:
    """Hash of the suite's content-defining inputs (version, word banks, families, sizes)."""
    text = json.dumps({"version": SUITE_VERSION, "sizes": sizes.__dict__,
                       "banks": [W.CAPITALS, W.PLURALS, W.PAST_TENSES, W.ANTONYMS, W.ANIMALS, W.CATEGORIES,
                                 W.NAMES, W.EVENTS, W.PLACES, W.ITEMS, W.TIPS],
                       "families": [(f.name, f.phrasings, f.held_out) for f in FAMILIES],
                       "unseen": sorted(UNSEEN_FAMILIES), "prompt": [SECTIONS_WITH_INPUT, SECTIONS_NO_INPUT]},
                      sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_jsonl(records: Sequence[dict], path: Path) -> Path:
    """One JSON object per line (UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def build_suite(out_dir: str | Path, sizes: SuiteSizes) -> dict[str, Path]:
    """Write every split as JSONL under `out_dir` (train, student_train, dev and test sets); returns their paths."""
    out_dir = Path(out_dir)
    train = generate_split("train", sizes.train)
    paths = {"train": write_jsonl(train, out_dir / "train.jsonl"),
             "student_train": write_jsonl(train[: sizes.student_train], out_dir / "student_train.jsonl")}
    tests = {split: generate_split(split, sizes.test) for split in TEST_SPLITS}
    for split, mirrored in DEV_SPLITS.items():
        size = sizes.dev if split == "dev" else sizes.dev_ood
        paths[split] = write_jsonl(generate_split(split, size, exclude=tests[mirrored]), out_dir / f"{split}.jsonl")
    for split, rows in tests.items():
        paths[split] = write_jsonl(rows, out_dir / f"{split}.jsonl")
    return paths


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def suite_stats(paths: dict[str, Path]) -> dict[str, dict]:
    """Per split: size, families, mean input/reference length in words, exact overlap with the training prompts
    and, for a dev split, with the test split it mirrors."""
    train_keys = {_key(r) for r in read_jsonl(paths["train"])}
    stats = {}
    for split, path in paths.items():
        rows = read_jsonl(path)
        first = [r["output"] if isinstance(r["output"], str) else r["output"][0] for r in rows]
        stats[split] = {
            "records": len(rows),
            "families": dict(Counter(r["family"] for r in rows)),
            "input_words": round(sum(len((r["instruction"] + " " + r["input"]).split()) for r in rows) / len(rows), 1),
            "answer_words": round(sum(len(o.split()) for o in first) / len(rows), 1),
            "in_train": 0.0 if split in ("train", "student_train") else
            round(sum(_key(r) in train_keys for r in rows) / len(rows), 3),
        }
        if split in DEV_SPLITS and DEV_SPLITS[split] in paths:
            test_keys = {_key(r) for r in read_jsonl(paths[DEV_SPLITS[split]])}
            stats[split]["in_test"] = round(sum(_key(r) in test_keys for r in rows) / len(rows), 3)
    return stats


def corpus_text(paths: dict[str, Path], limit: int | None = None) -> list[str]:
    """Training texts for the tokenizers.

    Prompts (the records' own, `demo_prompt`) and references of the train split, plus the word banks.
    """
    texts: list[str] = []
    for row in read_jsonl(paths["train"])[:limit]:
        refs = [row["output"]] if isinstance(row["output"], str) else row["output"]
        texts += [row["prompt"], refs[0]]
    banks = [*W.CAPITALS, *W.CAPITALS.values(), *W.PLURALS, *W.PLURALS.values(), *W.PAST_TENSES,
             *W.PAST_TENSES.values(), *W.ANTONYMS, *W.ANTONYMS.values(), *W.LIST_WORDS, *W.NAMES, *W.COLOURS]
    texts.append(" ".join(banks))
    return [t for t in texts if t]

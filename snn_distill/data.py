"""Training text: load it, split off a held-out set, tokenize it, and batch it.

Sources (`load_texts`): the built-in synthetic smart-glasses prompts, a plain prompts file, a local
`.txt`/`.jsonl` file or `save_to_disk` folder, or a Hugging Face Hub dataset id (aliases such as
`wikitext-2`, or `name:config`). Every user error raises `DataError` with a one-line fix.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset cannot be used as given; the message says what is wrong and how to fix it."""


DATASET_ALIASES: dict[str, tuple[str, str | None]] = {
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-2-raw": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-103": ("wikitext", "wikitext-103-raw-v1"),
    "wikitext-103-raw": ("wikitext", "wikitext-103-raw-v1"),
    "tinystories": ("roneneldan/TinyStories", None),
}

# Preferred names for the text column, most specific first; otherwise the first string column wins.
TEXT_COLUMNS = ("text", "content", "story", "document", "sentence", "prompt")
_TEXT_SUFFIXES = ("", ".txt", ".text", ".md")
_JSON_SUFFIXES = (".jsonl", ".json")
_TRUE = {"1", "ON", "YES", "TRUE"}


# ----------------------------------------------------------------------------------------------
# Synthetic smart-glasses prompts
# ----------------------------------------------------------------------------------------------

_PLACES = [
    "pharmacy",
    "coffee shop",
    "train station",
    "bus stop",
    "grocery store",
    "post office",
    "public library",
    "hospital",
    "bank",
    "bakery",
    "hardware store",
    "gas station",
]
_STREETS = ["Main Street", "Oak Avenue", "Harbor Road", "Elm Street", "Station Square", "Maple Drive"]
_DIRECTIONS = ["north", "south", "east", "west"]
_NAMES = ["Maya", "Sam", "Priya", "Jonas", "Aisha", "Leo", "Grandma", "Dr. Patel", "my sister", "Carlos"]
_MESSAGES = [
    "I'm running ten minutes late",
    "I'll pick up dinner on the way home",
    "the meeting moved to three o'clock",
    "I just landed and I'm waiting for my bag",
    "I left my keys on the kitchen table",
    "we're out of milk",
    "I'm outside the front entrance",
    "I'll call back after the movie",
]
_OBJECTS = ["car", "jacket", "front door", "building", "bicycle", "umbrella", "backpack", "bus"]
_STATES = [
    ("crosswalk signal", "green"),
    ("door", "open"),
    ("shop", "still open"),
    ("bench", "wet"),
    ("elevator", "going up"),
    ("parking spot", "free"),
    ("escalator", "working"),
    ("table", "taken"),
]
_QUEUES = ["bus stop", "counter", "crosswalk", "entrance", "ticket machine", "checkout"]
_LABEL_ITEMS = ["medicine bottle", "cereal box", "milk carton", "bottle of sunscreen", "jar of sauce"]
_LABEL_ASKS = [
    "the expiry date",
    "how much sugar it has",
    "whether it contains nuts",
    "the recommended dose",
]
_TASKS = [
    "take my medication",
    "water the plants",
    "call the dentist",
    "buy a birthday card",
    "pick up the dry cleaning",
    "move the car",
    "charge my glasses",
    "send the invoice",
    "book a table for Friday",
    "stretch my back",
]
_WHENS = ["in twenty minutes", "at six tonight", "tomorrow morning", "after lunch", "on Saturday"]
_ARRIVALS = ["home", "to work", "back to the car", "to the station"]
_RAIN_WHENS = ["this afternoon", "tonight", "tomorrow morning", "on Saturday", "during my run"]
_DAYS = ["today", "tomorrow", "this afternoon", "on Friday", "next Monday"]
_TIMES = ["nine", "ten thirty", "noon", "two o'clock", "half past four"]
_EVENTS = ["meeting", "dentist appointment", "lunch", "video call", "team review", "haircut"]
_CITIES = ["Boston", "Berlin", "Tokyo", "Lisbon", "Toronto", "Melbourne", "Madrid", "Seattle"]
_LANGS = ["Spanish", "French", "German", "Italian", "Portuguese", "Japanese"]
# (English phrase, language, translation): real translations so answers stay truthful.
_TRANSLATIONS = [
    ("thank you", "Spanish", "gracias"),
    ("thank you", "French", "merci"),
    ("thank you", "German", "danke"),
    ("thank you", "Italian", "grazie"),
    ("thank you", "Portuguese", "obrigado"),
    ("thank you", "Japanese", "arigatou gozaimasu"),
    ("good morning", "Spanish", "buenos días"),
    ("good morning", "French", "bonjour"),
    ("good morning", "German", "guten Morgen"),
    ("good morning", "Italian", "buongiorno"),
    ("good morning", "Portuguese", "bom dia"),
    ("good morning", "Japanese", "ohayou gozaimasu"),
    ("excuse me", "Spanish", "disculpe"),
    ("excuse me", "French", "excusez-moi"),
    ("excuse me", "German", "Entschuldigung"),
    ("excuse me", "Italian", "mi scusi"),
    ("excuse me", "Portuguese", "com licença"),
    ("excuse me", "Japanese", "sumimasen"),
    ("where is the train station", "Spanish", "¿dónde está la estación de tren?"),
    ("where is the train station", "French", "où est la gare ?"),
    ("where is the train station", "German", "wo ist der Bahnhof?"),
    ("where is the train station", "Italian", "dov'è la stazione?"),
    ("where is the train station", "Portuguese", "onde fica a estação de trem?"),
    ("where is the train station", "Japanese", "eki wa doko desu ka?"),
    ("how much does this cost", "Spanish", "¿cuánto cuesta esto?"),
    ("how much does this cost", "French", "combien ça coûte ?"),
    ("how much does this cost", "German", "wie viel kostet das?"),
    ("how much does this cost", "Italian", "quanto costa?"),
    ("how much does this cost", "Portuguese", "quanto custa isso?"),
    ("how much does this cost", "Japanese", "kore wa ikura desu ka?"),
    ("the check, please", "Spanish", "la cuenta, por favor"),
    ("the check, please", "French", "l'addition, s'il vous plaît"),
    ("the check, please", "German", "die Rechnung, bitte"),
    ("the check, please", "Italian", "il conto, per favore"),
    ("the check, please", "Portuguese", "a conta, por favor"),
    ("the check, please", "Japanese", "okaikei onegaishimasu"),
]
_PHRASES = sorted({p for p, _, _ in _TRANSLATIONS})
# (verb, food, answer) for "how long should I ..." questions and their dialogue answers.
_COOK_TIMES = [
    ("boil", "an egg", "about seven minutes for a soft yolk, or ten for hard-boiled"),
    ("steam", "broccoli", "four to five minutes, until it turns bright green and just tender"),
    ("bake", "salmon fillets", "twelve to fifteen minutes at 200 degrees Celsius"),
    ("roast", "potatoes", "40 to 45 minutes at 220 degrees Celsius, turning them halfway"),
    ("grill", "chicken thighs", "six to eight minutes per side, until the inside reaches 75 degrees"),
    ("simmer", "green lentils", "20 to 25 minutes, until they are soft but still hold their shape"),
    ("cook", "white rice", "about 18 minutes with the lid on, then let it rest for five"),
    ("toast", "pine nuts", "two to three minutes in a dry pan, stirring so they don't burn"),
]
_DISHES = ["a vegetable curry", "pancakes for four people", "a birthday cake", "tacos tonight", "a picnic"]
_INGREDIENTS = ["eggs", "spinach", "rice", "chickpeas", "tomatoes", "leftover chicken", "tofu", "pasta"]
_SUBSTITUTES = ["buttermilk", "fresh basil", "brown sugar", "heavy cream", "an egg", "white wine"]
_CONVERSIONS = [
    ("two cups of flour", "grams"),
    ("350 degrees Fahrenheit", "Celsius"),
    ("one pound of butter", "grams"),
    ("half a liter", "cups"),
    ("three tablespoons", "milliliters"),
    ("eight ounces", "grams"),
]
_TIMER_FOODS = ["pasta", "eggs", "bread", "soup", "cookies", "rice"]
_MINUTES = ["three", "five", "eight", "ten", "twelve", "fifteen", "twenty", "forty-five"]
_ITEMS = [
    "oat milk",
    "batteries",
    "dish soap",
    "bananas",
    "coffee beans",
    "paper towels",
    "olive oil",
    "toothpaste",
]
_PRODUCTS = ["headphones", "running shoes", "laundry detergent", "cereal", "light bulbs", "notebooks"]
_STORES = ["supermarket", "pharmacy", "hardware store", "farmers market"]
_WORKOUTS = ["run", "bike ride", "brisk walk", "hike", "rowing session"]
_DISTANCES = ["kilometer", "mile", "half mile"]
_DIETS = ["vegetarian", "gluten-free", "dairy-free", "not spicy", "under fifteen dollars", "vegan"]
_SIGNS = [
    "street sign",
    "poster on the wall",
    "warning sign",
    "note on the door",
    "sign in the shop window",
    "whiteboard",
]
_COUNTRIES = ["Canada", "Portugal", "Kenya", "Vietnam", "Chile", "Norway", "Morocco", "New Zealand"]
_LANDMARKS = ["Eiffel Tower", "Statue of Liberty", "Golden Gate Bridge", "Big Ben", "Sydney Opera House"]
_CONCEPTS = [
    "how a rainbow forms",
    "why the sky is blue",
    "what inflation means",
    "how vaccines work",
    "what a leap year is",
    "how noise-cancelling works",
    "why bread rises",
]
_GOALS = [
    "fall asleep faster",
    "remember people's names",
    "keep my phone battery healthy",
    "stay focused while studying",
    "drink more water",
    "learn a few words of a new language",
]
_SCENES = [
    "You're on a busy sidewalk. A coffee shop is on your left, and two people are waiting at the bus stop ahead.",
    "You're facing a kitchen counter with a cutting board, three tomatoes and a knife near the edge.",
    "There's a crosswalk in front of you. The signal shows a red hand, so wait before crossing.",
    "You're in a park. A path curves to the right past a bench, and a dog is playing on the grass.",
    "You're looking at a bookshelf. The middle shelf has cookbooks, and a blue vase sits on top.",
    "A train platform stretches ahead. The display says the next train arrives in four minutes.",
    "You're in a small office. A laptop is open on the desk and a coat hangs on the chair.",
    "There's a staircase going down to your right with a handrail on both sides.",
]
_WEATHER = [
    ("sunny", "22", "Sunglasses would be a good idea."),
    ("raining lightly", "14", "You might want an umbrella."),
    ("cloudy and cool", "11", "A light jacket should be enough."),
    ("windy", "17", "Hold on to your hat near the water."),
    ("snowing", "-2", "Watch your step on the sidewalks."),
]
_CALENDAR = [
    ("a dentist appointment", "nine"),
    ("a team meeting", "ten thirty"),
    ("lunch with Priya", "noon"),
    ("a video call with Jonas", "two o'clock"),
    ("yoga class", "half past five"),
]


def _expand(template: str, limit: int | None = None, **slots: Sequence[Any]) -> list[str]:
    """Fill `template` with every combination of slot values (itertools.product order).

    `limit` keeps that many combinations so one big template cannot swamp the mix. They are taken
    with a stride coprime to the product size: a plain even stride can be a multiple of the last
    slot's size and then always picks that slot's first value.
    """
    keys = list(slots)
    combos = list(itertools.product(*(slots[k] for k in keys)))
    n = len(combos)
    if limit is not None and n > limit:
        step = max(1, n // limit)
        while math.gcd(step, n) != 1:
            step += 1
        combos = [combos[(i * step) % n] for i in range(limit)]
    return [template.format(**dict(zip(keys, combo))) for combo in combos]


def _t(template: str, limit: int | None = None, **slots: Sequence[Any]) -> tuple[str, int | None, dict]:
    """One template of the built-in prompt set, with its slot values (filled by `_expand`)."""
    return template, limit, slots


# The built-in prompt set, one template (or list of plain prompts) per entry; `synthetic_prompts`
# fills and interleaves them.
_TEMPLATES = [
    # Navigation
    _t("How do I get to the nearest {p} from here?", p=_PLACES),
    _t("Is there a {p} within walking distance?", p=_PLACES),
    _t("Give me walking directions to the {p} on {s}.", limit=24, p=_PLACES, s=_STREETS),
    _t("Which way is the {p}? I think I'm facing {d}.", limit=16, p=_PLACES, d=_DIRECTIONS),
    _t(
        "I'm lost somewhere near {s}. Can you guide me back to the {p} and tell me before each turn?",
        limit=18,
        s=_STREETS,
        p=_PLACES,
    ),
    _t("How long will it take to walk to the {p} if I leave now?", p=_PLACES),
    _t(
        "I'm at the {p} but I can't find the entrance. Look around and tell me where the door is.",
        p=_PLACES[:8],
    ),
    # Messages and calls
    _t("Text {n} that {m}.", limit=40, n=_NAMES, m=_MESSAGES),
    _t("Send a message to {n} saying {m}.", limit=24, n=_NAMES, m=_MESSAGES),
    _t("Read me the last message from {n}.", n=_NAMES),
    _t("Did {n} reply to my text yet?", n=_NAMES),
    _t("Please call {n} on speaker.", n=_NAMES),
    _t(
        "I'm meeting {n} at the {p} on {s} in half an hour. Tell me when I should leave, which way "
        "to walk, and remind me to bring an umbrella if it's going to rain.",
        limit=20,
        n=_NAMES,
        p=_PLACES,
        s=_STREETS,
    ),
    # Describing the scene
    [
        "Describe what's in front of me.",
        "What am I looking at right now?",
        "Is there anything on the ground I might trip over?",
        "Tell me if someone is walking toward me.",
        "Who is the person waving at me? I think I've met them before, but I can't remember where.",
    ],
    _t("Describe the scene on my {side} in a few words.", side=["left", "right"]),
    _t("What color is the {o} I'm looking at?", o=_OBJECTS),
    _t("Is the {st[0]} in front of me {st[1]}?", st=_STATES),
    _t("How many people are waiting at the {q}?", q=_QUEUES),
    _t("Read the label on this {i} and tell me {a}.", i=_LABEL_ITEMS, a=_LABEL_ASKS),
    # Reminders
    _t("Remind me to {t} {w}.", limit=40, t=_TASKS, w=_WHENS),
    _t("Set a reminder to {t} when I get {a}.", limit=20, t=_TASKS, a=_ARRIVALS),
    _t("What reminders do I have {d}?", d=_DAYS),
    # Translation
    _t("How do you say '{p}' in {lang}?", p=_PHRASES, lang=_LANGS),
    _t("Translate this menu from {lang} into English.", lang=_LANGS),
    _t(
        "The person in front of me is speaking {lang}. Listen and translate what they say, sentence by sentence.",
        lang=_LANGS,
    ),
    # Calendar
    _t("What's on my calendar {d}?", d=_DAYS),
    _t("Schedule a {ev} with {n} {d} at {t}.", limit=30, ev=_EVENTS, n=_NAMES, d=_DAYS, t=_TIMES),
    _t("Move my {ev} to {t}.", limit=20, ev=_EVENTS, t=_TIMES),
    _t("Am I free {d} at {t}?", d=_DAYS, t=_TIMES),
    # Weather
    _t("Will it rain in {c} {w}?", limit=20, w=_RAIN_WHENS, c=_CITIES),
    _t("Do I need a jacket {d}?", d=_DAYS),
    _t("What's the weather going to be like in {c} this weekend?", c=_CITIES),
    # Cooking
    _t("How long should I {f[0]} {f[1]}?", f=_COOK_TIMES),
    _t("What can I make for dinner with {a} and {b}?", limit=20, a=_INGREDIENTS, b=_INGREDIENTS[::-1]),
    _t("This recipe needs {i}, but I don't have any. What can I use instead?", i=_SUBSTITUTES),
    _t("Convert {c[0]} to {c[1]}.", c=_CONVERSIONS),
    _t("Start a {m}-minute timer for the {f}.", limit=16, m=_MINUTES, f=_TIMER_FOODS),
    # Shopping
    _t("Add {i} to my shopping list.", i=_ITEMS),
    _t("What's on my shopping list? I'm at the {s} now.", s=_STORES),
    _t("Are these {p} cheaper anywhere nearby?", p=_PRODUCTS),
    _t("Compare the two {p} I'm holding and tell me which one is better value.", p=_PRODUCTS),
    _t(
        "I'm in the {s} and I need everything for {d}. Check my shopping list, tell me what's "
        "missing, and guide me to the right aisles, starting with the closest one.",
        s=_STORES[:1] + _STORES[3:],
        d=_DISHES,
    ),
    # Fitness
    _t("Start a {w} and tell me my pace every {d}.", limit=12, w=_WORKOUTS, d=_DISTANCES),
    _t("What was my average heart rate during this morning's {w}?", w=_WORKOUTS),
    _t("Pause the workout. I'm stopping at the {p} for a minute.", p=_PLACES[:6]),
    ["How many steps have I walked today?", "How far did I walk this week compared to last week?"],
    # Reading signs and menus
    _t("Read the menu and tell me which dishes are {d}.", d=_DIETS),
    _t("What does that {s} say?", s=_SIGNS),
    _t(
        "Read the departure board for me. When does the next train to {c} leave, and from which platform?",
        c=_CITIES,
    ),
    # General questions
    _t("What's the capital of {c}?", c=_COUNTRIES),
    _t("How tall is the {lm}, and when was it built?", lm=_LANDMARKS),
    _t("Explain {c} in one or two sentences.", c=_CONCEPTS),
    _t("What's a good way to {g}?", g=_GOALS),
    # Short conversations, so the text is not only questions
    _t(
        "User: How far is the nearest {p}? Assistant: The closest {p} is about {d} meters away. "
        "Turn {t} at the next corner and it will be on your {s}.",
        limit=36,
        p=_PLACES,
        d=["150", "300", "450", "800"],
        t=["left", "right"],
        s=["left", "right"],
    ),
    _t(
        "User: Set a timer for {m} minutes. Assistant: Done. Your {m}-minute timer is running, "
        "and I'll let you know when it's finished.",
        m=_MINUTES,
    ),
    _t(
        "User: What's the weather like in {c}? Assistant: Right now it's {w[0]} in {c}, about {w[1]} degrees. {w[2]}",
        limit=25,
        c=_CITIES,
        w=_WEATHER,
    ),
    _t(
        "User: Text {n} that {m}. Assistant: Okay, I sent {n} a message saying {m}.",
        limit=20,
        n=_NAMES,
        m=_MESSAGES,
    ),
    _t("User: Describe what's in front of me. Assistant: {s}", s=_SCENES),
    _t(
        "User: How long should I {c[0]} {c[1]}? Assistant: Plan on {c[2]}. Do you want me to start "
        "a timer when you're ready?",
        c=_COOK_TIMES,
    ),
    _t(
        "User: How do you say '{t[0]}' in {t[1]}? Assistant: In {t[1]}, '{t[0]}' is '{t[2]}'.",
        t=_TRANSLATIONS,
    ),
    _t(
        "User: Remind me to {t} {w}. Assistant: Got it. I'll remind you to {t} {w}.",
        limit=20,
        t=_TASKS,
        w=_WHENS,
    ),
    _t(
        "User: What's on my calendar {d}? Assistant: You have {c[0]} at {c[1]}, and nothing else until the evening.",
        limit=15,
        d=_DAYS[:3],
        c=_CALENDAR,
    ),
]


def _synthetic_groups() -> list[list[str]]:
    """One list of filled templates per template; `synthetic_prompts` interleaves them."""
    # an entry is a `_t(...)` template or a plain list of prompts used as they are
    return [entry if isinstance(entry, list) else _expand(entry[0], entry[1], **entry[2]) for entry in _TEMPLATES]


def synthetic_prompts() -> list[str]:
    """The built-in prompt set: >= 500 distinct smart-glasses requests and short dialogues.

    Deterministic: templates x slot values, interleaved round-robin across templates so any prefix
    (e.g. `max_texts`) still mixes navigation, messages, scenes, cooking and so on.
    """
    groups = _synthetic_groups()
    seen: set[str] = set()
    out: list[str] = []
    for row in itertools.zip_longest(*groups):
        for text in row:
            if text is not None and text not in seen:
                seen.add(text)
                out.append(text)
    return out


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def resolve_dataset(name: str) -> tuple[str, str | None]:
    """Map a user-facing dataset name to a Hub (path, config): aliases, then `name:config`."""
    key = name.strip()
    if key.lower() in DATASET_ALIASES:
        return DATASET_ALIASES[key.lower()]
    if ":" in key:
        path, _, config = key.partition(":")
        if not path or not config:
            raise DataError(
                f"dataset {name!r} is malformed; write it as name or name:config, e.g. wikitext:wikitext-2-raw-v1"
            )
        if path.lower() in DATASET_ALIASES:  # an alias with an explicit config keeps the alias' repo
            path = DATASET_ALIASES[path.lower()][0]
        return path, config
    return key, None


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as a short single line, for embedding in a DataError message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clean(texts: Sequence[Any]) -> list[str]:
    """Drop non-strings and empty/whitespace-only texts (wikitext is about one third blank lines)."""
    return [t for t in texts if isinstance(t, str) and t.strip()]


def _read_lines(path: Path) -> list[str]:
    """One text per line, stripped; blank lines dropped."""
    try:
        with path.open(encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({_one_line(exc)}); save it as UTF-8 .txt/.jsonl") from exc


def _pick_column(columns: Sequence[str], is_string: dict[str, bool], source: str) -> str:
    """The text column: a preferred name that holds strings, else the first string column."""
    for name in TEXT_COLUMNS:
        if name in columns and is_string.get(name, False):
            return name
    for name in columns:
        if is_string.get(name, False):
            return name
    raise DataError(
        f"{source} has no text column (columns: {', '.join(map(str, columns)) or 'none'}); "
        f"add a string column named one of {', '.join(TEXT_COLUMNS)}"
    )


def _read_json(path: Path) -> list[str]:
    """A .jsonl file (one object per line) or a .json list; the text column is autodetected."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 ({_one_line(exc)}); save it as UTF-8 JSON lines") from exc
    rows: list[Any] | None = None
    if path.suffix == ".json":
        with contextlib.suppress(json.JSONDecodeError):
            whole = json.loads(raw)
            rows = whole if isinstance(whole, list) else [whole]
    if rows is None:
        rows = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno} is not valid JSON ({exc.msg}); write one JSON object per line"
                ) from exc
    if rows and all(isinstance(r, str) for r in rows):  # a list of bare strings is already the texts
        return rows
    dict_rows = [r for r in rows if isinstance(r, dict)]
    if len(dict_rows) != len(rows):
        raise DataError(f"{path} mixes JSON objects with other values; write one JSON object per line")
    columns: list[str] = []
    is_string: dict[str, bool] = {}
    for r in dict_rows:
        for k, v in r.items():
            if k not in is_string:
                columns.append(k)
                is_string[k] = False
            if isinstance(v, str):
                is_string[k] = True
    col = _pick_column(columns, is_string, str(path))
    return [r.get(col) for r in dict_rows]


def _dataset_texts(ds: Any, split: str, source: str) -> list[Any]:
    """Texts of a `datasets` Dataset or DatasetDict (split, else "train", else the first split)."""
    from datasets import DatasetDict, Value

    if isinstance(ds, DatasetDict):
        if not ds:
            raise DataError(f"{source} holds no splits; save a dataset with at least one split")
        chosen = split if split in ds else "train" if "train" in ds else next(iter(ds))
        ds = ds[chosen]
    columns = list(ds.column_names)
    is_string = {k: isinstance(f, Value) and f.dtype in ("string", "large_string") for k, f in ds.features.items()}
    col = _pick_column(columns, is_string, source)
    # Arrow round-trip: ~40x faster than iterating a datasets Column for millions of rows.
    return ds.with_format("arrow")[col].to_pylist()


def _load_local(path: Path, split: str) -> list[Any]:
    """A local .txt/.jsonl/.json file or a `save_to_disk` folder."""
    if path.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as exc:
            raise DataError(
                f"{path} is a folder but not a datasets save_to_disk folder ({_one_line(exc)}); "
                "pass a .txt/.jsonl file or a folder written by Dataset.save_to_disk"
            ) from exc
        return _dataset_texts(ds, split, str(path))
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES:
        return _read_json(path)
    if suffix in _TEXT_SUFFIXES:
        return _read_lines(path)
    raise DataError(
        f"{path} has an unsupported file type {suffix!r}; use a .txt file (one text per line), "
        "a .jsonl file or a save_to_disk folder"
    )


def _looks_like_path(name: str) -> bool:
    """True for names that can only be local paths (so a typo fails fast instead of asking the Hub)."""
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.lower().endswith(_JSON_SUFFIXES + _TEXT_SUFFIXES[1:])
        or name.count("/") > 1
    )


@contextlib.contextmanager
def _honour_offline_env() -> Iterator[None]:
    """Apply HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set after `datasets` was imported.

    Both libraries read the variable once at import; without this, a late `HF_HUB_OFFLINE=1`
    (a test, a notebook) is ignored and an offline miss takes ~25 s of HTTP retries, not ~1 ms.
    Restored on exit so nothing changes globally.
    """
    if not any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        yield
        return
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved = (ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_hub(name: str, split: str) -> list[Any]:
    """A Hub dataset through `datasets.load_dataset` (uses the local HF cache when offline)."""
    path, config = resolve_dataset(name)
    import datasets

    shown = path if config is None else f"{path}:{config}"
    label = repr(name) if shown == name else f"{name!r} ({shown})"
    try:
        with _honour_offline_env():
            ds = datasets.load_dataset(path, config, split=split)
    except Exception as exc:
        raise DataError(
            f"dataset {label} split {split!r} not found locally or on the Hugging Face Hub "
            f"({_one_line(exc)}); pass a local .txt/.jsonl file or a save_to_disk folder, or check the "
            "name (use name:config for datasets with several configs) and your connection"
        ) from exc
    return _dataset_texts(ds, split, f"dataset {shown}")


def load_texts(
    dataset: str = "synthetic",
    dataset_path: str | None = None,
    split: str = "train",
    max_texts: int | None = None,
) -> list[str]:
    """Non-empty training texts from `dataset_path` (a prompts file) or `dataset`.

    `dataset`: "synthetic", a local .txt/.jsonl/.json file or save_to_disk folder, an alias from
    DATASET_ALIASES, or a Hub id (optionally `name:config`). `max_texts` keeps the first N texts.
    """
    if max_texts is not None and max_texts < 1:
        raise DataError(f"max_texts must be positive or None, got {max_texts}")
    if dataset_path is not None:
        path = Path(dataset_path).expanduser()
        if not path.exists():
            raise DataError(f"prompts file {dataset_path} does not exist; check --dataset-path")
        # A prompts file is plain text whatever its suffix; JSON files and save_to_disk folders are
        # still read as structured data rather than as raw lines.
        structured = path.is_dir() or path.suffix.lower() in _JSON_SUFFIXES
        texts = _load_local(path, split) if structured else _read_lines(path)
        source = f"prompts file {dataset_path}"
    elif dataset == "synthetic":
        texts, source = synthetic_prompts(), "the synthetic prompt set"
    else:
        path = Path(dataset).expanduser()
        if path.exists():
            texts, source = _load_local(path, split), str(path)
        elif _looks_like_path(dataset):
            raise DataError(f"dataset file {dataset} does not exist; check the path passed as --dataset")
        else:
            texts, source = _load_hub(dataset, split), f"dataset {dataset!r}"
    texts = _clean(texts)
    if not texts:
        raise DataError(f"{source} has no non-empty texts; add at least one line of text")
    return texts[:max_texts] if max_texts is not None else texts


def split_held_out(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (train, held_out) split of `texts`; both keep the original relative order.

    With fraction > 0 and at least two texts, each side gets at least one text.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"held-out fraction must be in [0, 1), got {fraction}; try 0.05")
    n = len(texts)
    if fraction == 0.0 or n < 2:
        return list(texts), []
    n_held = min(max(1, round(n * fraction)), n - 1)
    gen = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(n, generator=gen)[:n_held].tolist())
    train = [t for i, t in enumerate(texts) if i not in held]
    held_out = [t for i, t in enumerate(texts) if i in held]
    return train, held_out


# ----------------------------------------------------------------------------------------------
# Tokenizing and batching
# ----------------------------------------------------------------------------------------------


# Only input_ids are used; skipping the masks trims ~20% off the tokenizer call for large corpora.
_IDS_ONLY = {"return_attention_mask": False, "return_token_type_ids": False}


def tokenize_texts(texts: list[str], tokenizer: Any, max_length: int, pack: bool = False) -> list[list[int]]:
    """Token-id blocks of at most `max_length` tokens from one batched tokenizer call.

    pack=False: one block per text (with the tokenizer's special tokens, truncated), blocks
    under 2 tokens dropped (nothing to predict). pack=True: documents joined with EOS (when the
    tokenizer has one) and cut into consecutive `max_length` blocks; a tail under 2 tokens is dropped.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}; raise --max-length")
    if not texts:
        return []
    if not pack:
        enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length, **_IDS_ONLY)
        _log_truncated(texts, enc["input_ids"], tokenizer, max_length)
        return [list(ids) for ids in enc["input_ids"] if len(ids) >= 2]
    # verbose=False: long documents are expected here; they get cut into blocks, not truncated.
    enc = tokenizer(list(texts), add_special_tokens=False, verbose=False, **_IDS_ONLY)
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = [eos] if eos is not None else []
    flat: list[int] = []
    for i, ids in enumerate(enc["input_ids"]):
        if i and sep:
            flat.extend(sep)
        flat.extend(ids)
    blocks = [flat[i : i + max_length] for i in range(0, len(flat), max_length)]
    if blocks and len(blocks[-1]) < 2:
        blocks.pop()
    return blocks


def _log_truncated(texts: list[str], truncated_ids: list[list[int]], tokenizer: Any, max_length: int) -> int:
    """Log how many texts were cut at `max_length` tokens; only texts that reached it are re-tokenized."""
    full = [t for t, ids in zip(texts, truncated_ids) if len(ids) >= max_length]
    if not full:
        return 0
    lengths = [len(ids) for ids in tokenizer(full, add_special_tokens=True, verbose=False, **_IDS_ONLY)["input_ids"]]
    cut = sum(n > max_length for n in lengths)
    if cut:
        log.info(
            "%d of %d texts are longer than --max-length %d tokens (up to %d) and were truncated to it; "
            "--pack cuts long texts into blocks instead, a larger --max-length keeps more of each",
            cut,
            len(texts),
            max_length,
            max(lengths),
        )
    return cut


def reply_blocks(
    prompt_ids: Sequence[Sequence[int]],
    replies: Sequence[tuple[Sequence[int], int | None]],
    max_length: int,
) -> tuple[list[list[int]], list[int]]:
    """Prompt + reply examples: (blocks, reply_starts).

    Block i is prompt_ids[i] + reply ids + the stop token (when the reply ended with one), cut at
    `max_length`; reply_starts[i] is the index of its first reply token (= the prompt's length).
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}; raise --max-length")
    blocks, starts, cut = [], [], 0
    for p, (ids, stop) in zip(prompt_ids, replies):
        full = [*p, *ids, *([] if stop is None else [stop])]
        cut += len(full) > max_length
        blocks.append(full[:max_length])
        starts.append(min(len(p), max_length))
    if cut:
        log.info(
            "%d of %d prompt + reply examples are longer than --max-length %d tokens and were cut; a larger "
            "--max-length or a smaller --response-max-new-tokens keeps whole replies",
            cut,
            len(blocks),
            max_length,
        )
    return blocks, starts


def response_loss_mask(reply_starts: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: True at the positions whose next token is a real reply token (what a response-only
    loss weights; position i predicts token i + 1, so the prompt's last token predicts the reply's first)."""
    b, s = mask.shape
    starts = torch.as_tensor(list(reply_starts), dtype=torch.long, device=mask.device)
    next_pos = torch.arange(1, s + 1, device=mask.device)[None, :]
    next_real = torch.zeros_like(mask, dtype=torch.bool)
    next_real[:, :-1] = mask[:, 1:].bool()
    return (next_pos >= starts[:, None]) & next_real


def check_token_ids(blocks: Sequence[list[int]], vocab_size: int, teacher: str = "the teacher") -> None:
    """DataError when a token id has no row in the teacher's logits (a tokenizer from another model)."""
    top = max((max(b) for b in blocks if b), default=-1)
    if top >= vocab_size:
        raise DataError(
            f"vocabulary mismatch: the tokenizer of {teacher} produces token id {top} but the teacher has only "
            f"{vocab_size} logits; the tokenizer and the model come from different checkpoints: use the "
            "tokenizer saved with the model (same folder or Hub id)"
        )


def pad_batch(blocks: Sequence[list[int]], pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (input_ids [B, S] int64, attention_mask [B, S] int64), S = longest."""
    pad = 0 if pad_id is None else pad_id
    seq = max(len(b) for b in blocks)
    input_ids = torch.full((len(blocks), seq), pad, dtype=torch.long)
    mask = torch.zeros((len(blocks), seq), dtype=torch.long)
    for row, block in enumerate(blocks):
        input_ids[row, : len(block)] = torch.tensor(block, dtype=torch.long)
        mask[row, : len(block)] = 1
    return input_ids, mask


def fixed_batches(
    blocks: Sequence[list[int]], batch_size: int, pad_id: int | None, max_batches: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive, non-repeating batches of `blocks` in order (evaluation data; the last may be short)."""
    out = []
    for i in range(0, len(blocks), batch_size):
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(pad_batch(blocks[i : i + batch_size], pad_id))
    return out


class BlockBatcher:
    """Endless, resumable batches of token blocks for one data-parallel rank.

    Each epoch is a fresh permutation (torch.Generator seeded with seed + epoch) of all blocks;
    rank r of w takes positions r, r + w, ... of it, so ranks never share a block within an epoch.
    Batches always hold `batch_size` blocks and run on into the next epoch when one ends.
    """

    def __init__(
        self,
        blocks: list[list[int]],
        batch_size: int,
        pad_id: int | None,
        seed: int = 0,
        shuffle: bool = True,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if not blocks or not any(len(b) >= 2 for b in blocks):
            raise DataError("no training sequences of at least 2 tokens; use longer texts or a larger --max-length")
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        rank, world = shard
        if world < 1 or not 0 <= rank < world:
            raise DataError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
        if len(blocks) < world:
            raise DataError(
                f"only {len(blocks)} training sequences for {world} data-parallel ranks; "
                "use more data or fewer processes"
            )
        self.blocks = blocks
        self.batch_size = batch_size
        # Tokenizers such as GPT-2's have no pad token; any id works since the mask hides padding.
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world
        self.epoch = 0
        self.position = 0  # index into this epoch's shard order of the next block to serve
        self._order_epoch = -1
        self._order: list[int] = []
        self.last_indices: list[int] = []

    def __len__(self) -> int:
        """Blocks per epoch served by this rank."""
        return len(range(self.rank, len(self.blocks), self.world_size))

    @property
    def num_tokens(self) -> int:
        """Tokens in all blocks (the whole dataset, every rank)."""
        return sum(len(b) for b in self.blocks)

    def _epoch_order(self) -> list[int]:
        """This rank's block indices for `self.epoch` (cached; recomputed when the epoch changes)."""
        if self._order_epoch != self.epoch:
            n = len(self.blocks)
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + self.epoch)
                perm = torch.randperm(n, generator=gen).tolist()
            else:
                perm = list(range(n))
            self._order = perm[self.rank :: self.world_size]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, S] int64, attention_mask [B, S] int64), right-padded with pad_id to the
        longest block in the batch; mask is 1 on real tokens."""
        picked_idx: list[int] = []
        while len(picked_idx) < self.batch_size:
            order = self._epoch_order()
            take = min(self.batch_size - len(picked_idx), len(order) - self.position)
            picked_idx.extend(order[self.position : self.position + take])
            self.position += take
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        self.last_indices = picked_idx  # which blocks these rows are (keys for the teacher logit cache)
        return pad_batch([self.blocks[i] for i in picked_idx], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands, plus what it was built from (checked on load)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shard": [self.rank, self.world_size],
            "num_blocks": len(self.blocks),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict()` was taken; the data setup must match."""
        mine = self.state_dict()
        for key in ("num_blocks", "seed", "shuffle", "shard"):
            if key in state and list(_as_list(state[key])) != list(_as_list(mine[key])):
                raise DataError(
                    f"saved data-loader state has {key}={state[key]} but this run has {mine[key]}; "
                    "resume with the same dataset, --max-length, --pack, --seed and number of processes"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self):
            raise DataError(
                f"saved data-loader state (epoch {epoch}, position {position}) is invalid for "
                f"{len(self)} blocks per epoch; resume from an intact checkpoint"
            )
        self.epoch, self.position = epoch, position


def _as_list(value: Any) -> list[Any]:
    """Compare tuples/lists (JSON turns tuples into lists) and scalars alike."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def unigram_counts(blocks: list[list[int]], vocab_size: int) -> torch.Tensor:
    """Token counts over all blocks, float64 [vocab_size] (for a unigram-perplexity baseline)."""
    flat = torch.tensor(list(itertools.chain.from_iterable(blocks)), dtype=torch.long)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise DataError(
            f"token ids range over [{int(flat.min())}, {int(flat.max())}] but vocab_size is {vocab_size}; "
            "tokenize with the teacher's tokenizer and pass its vocab size"
        )
    return torch.bincount(flat, minlength=vocab_size).to(torch.float64)

"""The three customer-support tasks of the demo family, their rules, and their splits.

Every example is one line of text ``PROMPT ANSWER`` where the prompt ends with ``=``:

========  =========================================  ==============================
task      prompt                                     answer
========  =========================================  ==============================
shipping  ``ship zone 3 speed express weight 4 2 =``  ``carrier fedex eta 2``
refunds   ``refund day 1 7 item phone cond opened =``  ``escalate`` / ``partial 4`` ...
catalog   ``sku c 4 0 7 =``                          ``price 7 4 stock low wh east``
========  =========================================  ==============================

Numbers are written digit by digit (``weight 4 2`` is 42 kg, ``day 1 7`` is 17 days).
A scorer tokenizes ``prompt`` (the tokenizer adds ``<bos>``), then ``answer`` followed
by ``<eos>``; greedy decoding after the prompt must reproduce the answer exactly.

Each task has two rule tables. ``POLICY_CURRENT`` (v2) is what the specialists learn
and what the search / held-out slices ask for. ``POLICY_OLD`` (v1) is what the base
learned: the same prompts with a different answer in every rule cell, so the base
knows each task's structure but answers wrongly, and fine-tuning re-maps answers
instead of building new circuits.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("shipping", "refunds", "catalog")
POLICY_OLD = 1
POLICY_CURRENT = 2
SLICE_ROWS = 200  # rows per search and per held-out slice

@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    def as_row(self) -> dict[str, str]:
        return {"prompt": self.prompt, "answer": self.answer}


DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))

# -- shipping: zone 1-9, speed, weight 00-99 kg -> carrier and ETA in days ----------
SPEEDS: tuple[str, ...] = ("ground", "express", "overnight")
CARRIERS: tuple[str, ...] = ("usps", "ups", "fedex", "dhl")
# [speed][weight band]; bands: < 30 kg, 30-59 kg, >= 60 kg.
_CARRIER_V2: dict[str, tuple[str, ...]] = {
    "ground": ("usps", "ups", "fedex"),
    "express": ("ups", "fedex", "dhl"),
    "overnight": ("fedex", "dhl", "ups"),
}


def _weight_band(weight: int) -> int:
    return 0 if weight < 30 else 1 if weight < 60 else 2


def _eta_v2(zone: int, speed: str) -> int:
    if speed == "ground":
        return min(9, 2 + zone // 2)
    if speed == "express":
        return 1 + zone // 3
    return 1 if zone <= 3 else 2 if zone <= 6 else 3


def shipping_answer(zone: int, speed: str, weight: int, policy: int) -> str:
    carrier = _CARRIER_V2[speed][_weight_band(weight)]
    eta = _eta_v2(zone, speed)
    if policy == POLICY_OLD:  # v1: every carrier cell and every ETA cell differ
        carrier = CARRIERS[(CARRIERS.index(carrier) + 1) % len(CARRIERS)]
        eta = (eta + 4) % 10
    return f"carrier {carrier} eta {eta}"


def _shipping_cases() -> list[tuple[int, str, int]]:
    return list(itertools.product(range(1, 10), SPEEDS, range(100)))


def _shipping_example(case: tuple[int, str, int], policy: int) -> Example:
    zone, speed, weight = case
    prompt = f"ship zone {zone} speed {speed} weight {weight // 10} {weight % 10} ="
    return Example(prompt, shipping_answer(zone, speed, weight, policy))


# -- refunds: days since delivery 00-99, item group, condition -> decision ----------
ITEMS: tuple[str, ...] = ("shoes", "phone", "book", "toy", "sofa", "shirt")
CONDITIONS: tuple[str, ...] = ("new", "opened", "damaged", "defective")
DECISIONS: tuple[str, ...] = (
    "approve", "deny", "exchange", "escalate", *(f"partial {n}" for n in range(1, 10)),
)
_PRICEY = ("phone", "sofa")


def _day_band(days: int) -> int:
    return 0 if days < 10 else 1 if days < 30 else 2 if days < 60 else 3


def _refund_v2(band: int, item: str, condition: str) -> str:
    if condition == "defective":
        return "approve" if band < 2 else "exchange" if band < 3 else "escalate"
    if condition == "damaged":
        return f"partial {8 - 2 * band - (1 if item in _PRICEY else 0)}"
    if condition == "new":
        return "approve" if band < 2 else f"partial {5 - band}" if band < 3 else "deny"
    # opened
    if item in _PRICEY:
        return "escalate" if band < 2 else "deny"
    return "exchange" if band < 1 else "partial 3" if band < 3 else "deny"


def refund_answer(days: int, item: str, condition: str, policy: int) -> str:
    decision = _refund_v2(_day_band(days), item, condition)
    if policy == POLICY_OLD:  # v1: a different decision in every cell
        shift = 3 + ITEMS.index(item) % 2
        decision = DECISIONS[(DECISIONS.index(decision) + shift) % len(DECISIONS)]
    return decision


def _refund_cases() -> list[tuple[int, str, str]]:
    return list(itertools.product(range(100), ITEMS, CONDITIONS))


def _refund_example(case: tuple[int, str, str], policy: int) -> Example:
    days, item, condition = case
    prompt = f"refund day {days // 10} {days % 10} item {item} cond {condition} ="
    return Example(prompt, refund_answer(days, item, condition, policy))


# -- catalog: SKU = letter + 3 digits -> price digits, stock level, warehouse ------
SKU_LETTERS: tuple[str, ...] = ("a", "b", "c", "d", "e", "f", "g", "h")
STOCK_LEVELS: tuple[str, ...] = ("yes", "no", "low")
WAREHOUSES: tuple[str, ...] = ("east", "west", "north", "south")
_STOCK_V2: dict[str, str] = dict(zip(SKU_LETTERS, ("yes", "low", "no", "yes", "low", "yes", "no", "low"), strict=True))


def catalog_answer(letter: str, d1: int, d2: int, d3: int, policy: int) -> str:
    if policy == POLICY_OLD:  # v1: other price digits, stock and warehouse maps
        stock = STOCK_LEVELS[(STOCK_LEVELS.index(_STOCK_V2[letter]) + 1) % len(STOCK_LEVELS)]
        warehouse = WAREHOUSES[(d1 + 1) % len(WAREHOUSES)]
        return f"price {d2} {d3} stock {stock} wh {warehouse}"
    warehouse = WAREHOUSES[d1 % len(WAREHOUSES)]
    return f"price {d3} {d1} stock {_STOCK_V2[letter]} wh {warehouse}"


def _catalog_cases() -> list[tuple[str, int, int, int]]:
    return list(itertools.product(SKU_LETTERS, range(10), range(10), range(10)))


def _catalog_example(case: tuple[str, int, int, int], policy: int) -> Example:
    letter, d1, d2, d3 = case
    return Example(f"sku {letter} {d1} {d2} {d3} =", catalog_answer(letter, d1, d2, d3, policy))


# -- copy: the general-skill part of the base's training mix ------------------------
COPY_ALPHABET: tuple[str, ...] = DIGITS + SKU_LETTERS


def copy_example(rng: random.Random) -> Example:
    words = [rng.choice(COPY_ALPHABET) for _ in range(rng.randint(2, 6))]
    return Example(f"copy {' '.join(words)} =", " ".join(words))


# -- examples and splits -----------------------------------------------------------


@dataclass(frozen=True)
class TaskSplit:
    """One task's cases, split once: training pool, search slice, held-out slice.

    ``train`` holds the cases under both policies (index-aligned); search and held-out
    rows are always asked under the current policy.
    """

    task: str
    train_old: tuple[Example, ...]
    train_current: tuple[Example, ...]
    search: tuple[Example, ...]
    heldout: tuple[Example, ...]

    def train_prompts(self) -> frozenset[str]:
        return frozenset(e.prompt for e in self.train_current)


def _task_cases(task: str) -> list[tuple[Example, Example]]:
    """Every case of ``task`` as (old-policy example, current-policy example)."""
    if task == "shipping":
        return [(_shipping_example(c, POLICY_OLD), _shipping_example(c, POLICY_CURRENT)) for c in _shipping_cases()]
    if task == "refunds":
        return [(_refund_example(c, POLICY_OLD), _refund_example(c, POLICY_CURRENT)) for c in _refund_cases()]
    if task == "catalog":
        return [(_catalog_example(c, POLICY_OLD), _catalog_example(c, POLICY_CURRENT)) for c in _catalog_cases()]
    raise ValueError(f"unknown demo task {task!r}; expected one of {TASKS}")


def split_task(task: str, seed: int) -> TaskSplit:
    """Shuffle every case of ``task`` with ``seed``; the first rows become the slices."""
    cases = _task_cases(task)
    random.Random(f"{task}:{seed}").shuffle(cases)
    heldout = cases[:SLICE_ROWS]
    search = cases[SLICE_ROWS : 2 * SLICE_ROWS]
    train = cases[2 * SLICE_ROWS :]
    return TaskSplit(
        task=task,
        train_old=tuple(old for old, _ in train),
        train_current=tuple(current for _, current in train),
        search=tuple(current for _, current in search),
        heldout=tuple(current for _, current in heldout),
    )


def split_tasks(seed: int) -> dict[str, TaskSplit]:
    return {task: split_task(task, seed) for task in TASKS}


def vocabulary() -> tuple[str, ...]:
    """Every word any example can contain, in a fixed order (specials excluded)."""
    words = [
        "=", "copy", *DIGITS,
        "ship", "zone", "speed", "weight", *SPEEDS, "carrier", *CARRIERS, "eta",
        "refund", "day", "item", "cond", *ITEMS, *CONDITIONS,
        "approve", "deny", "exchange", "escalate", "partial",
        "sku", *SKU_LETTERS, "price", "stock", *STOCK_LEVELS, "wh", *WAREHOUSES,
    ]
    return tuple(dict.fromkeys(words))

"""A deterministic, generated pretraining corpus where thinking helps predict the next token.

Why generated: the main command must run with no downloads, and RLP needs text whose continuation
is *inferable* (an answer follows from the numbers before it) so a thought before the next token
can raise its likelihood. Each document comes from one of six sources:

    source      quality          what it looks like
    arithmetic  high / medium    multi-step sums with worked steps (high) or terse equation drills
    algebra     high             "Solve 3x + 7 = 22" with each rearrangement and a check
    records     high             invoices / score sheets: key: value lines, then totals and averages
    lists       high             a list of numbers, then sorted, reversed, count, min, max, sum
    textbook    high             explanatory prose about number facts, each with a worked example
    web         medium / low     generic prose (medium) or spammy filler, ads, word salad (low)

"quality" is a label the two-phase data tools (issue 8) use to build tiers; the low tier is
deliberately easy to tell apart (shouting, urls, repetition) so a small classifier can learn it.

Thinking-style documents (`think_share`, off by default, on in the embedded dataset): a share of
the worked arithmetic and algebra documents write a thought right before a result, in the layout
an RLP rollout has (context, `<think>`, thought, `</think>`, the next token):

    Step 1: 45 + 37 =<think>5 + 7 = 12. 4 + 3 + 1 = 8. so 82</think> 82
    Solve for x: 3x + 7 = 22.
    x =<think>3x = 22 - 7 = 15. x = 15 / 3 = 5. so 5</think> 5.

The thought does work the text leaves implicit (column-wise carries and borrows, the isolating
steps) and ends with the result, so a model that has learned the format predicts the result
better after thinking than without. Which documents think is drawn from a generator of its own,
so every document's text is the same with and without thinking apart from the thought spans
(the shipped tokenizer was trained on the think-free text; `<think>`/`</think>` are its special
tokens).

Determinism: document i is drawn from its own `random.Random(f"{seed}:{i}")` (string seeds hash
with SHA-512, independent of PYTHONHASHSEED), so
`generate_corpus(n, s)[:k] == generate_corpus(k, s)`
and the output never depends on the process, platform or number of documents asked for.
Bump CORPUS_VERSION when any template changes: caches built from the old text are then rebuilt.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import uuid
from typing import Callable, Iterable, Iterator

# The thinking markers the corpus writes (the tokenizer makes them special tokens).
THINK_START, THINK_END = "<think>", "</think>"

CORPUS_VERSION = 2  # 2: thinking-style documents (think_share)

SOURCES = ("arithmetic", "algebra", "records", "lists", "textbook", "web")
QUALITIES = ("high", "medium", "low")

# Share of documents per generator (sums to 1). Web text is the "natural distribution" filler
# that phase 1 of two-phase pretraining keeps and phase 2 down-weights.
_MIX = (
    ("arithmetic", 0.22),
    ("algebra", 0.14),
    ("records", 0.14),
    ("lists", 0.12),
    ("textbook", 0.10),
    ("web", 0.28),
)

_NAMES = ("Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ivan", "Zoe", "Ravi", "Lena", "Kofi", "Yuki")
_ITEMS = (
    "apple", "pencil", "notebook", "lamp", "cable", "mug", "chair", "battery", "ticket", "book",
    "plate", "towel", "candle", "brush", "bottle", "basket",
)
_SUBJECTS = ("math", "physics", "history", "art", "music", "biology", "chemistry", "reading")


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(f"megatron-rlp-corpus:{seed}:{index}")


# ----------------------------------------------------------------------------------------------
# thoughts: column-wise working that ends with the result
# ----------------------------------------------------------------------------------------------
def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _digits(n: int) -> list[int]:
    """Decimal digits of n >= 0, ones first."""
    return [int(c) for c in reversed(str(n))]


def _column_add(x: int, y: int) -> list[str]:
    """x + y (x, y >= 0) column by column, ones first; a carry is added in the next column."""
    xs, ys, carry, out = _digits(x), _digits(y), 0, []
    for i in range(max(len(xs), len(ys))):
        a, b = (xs[i] if i < len(xs) else 0), (ys[i] if i < len(ys) else 0)
        total = a + b + carry
        out.append(f"{a} + {b}" + (f" + {carry}" if carry else "") + f" = {total}")
        carry = total // 10
    return out


def _column_sub(x: int, y: int) -> list[str]:
    """x - y (x >= y >= 0) column by column; a borrow shows as 1 before the top digit and as the
    next top digit lowered by one."""
    xs, ys, borrow, out = _digits(x), _digits(y), 0, []
    for i, a in enumerate(xs):
        top, b = a - borrow, (ys[i] if i < len(ys) else 0)
        borrow = int(top < b)
        top += 10 * borrow
        out.append(f"{top} - {b} = {top - b}")
    return out


def _column_mul(x: int, k: int) -> list[str]:
    """x * k (x >= 0, one-digit k) digit by digit; the carry is added to the next product."""
    carry, out = 0, []
    for a in _digits(x):
        total = a * k + carry
        out.append(f"{a} * {k}" + (f" + {carry}" if carry else "") + f" = {total}")
        carry = total // 10
    return out


def operation_thought(a: int, op: str, b: int) -> str:
    """The working for `a op b` (b >= 0; a may be negative; '*' only by one digit): the same
    operation on magnitudes, column by column, then `so <result>`. When the signs change the
    operation, the magnitude operation is named first (`82 - 45:`)."""
    if op == "*":
        steps, head = _column_mul(abs(a), b), (f"{abs(a)} * {b}:" if a < 0 else "")
    elif (op == "+") == (a >= 0):               # a + b with a >= 0, or a - b with a < 0
        steps, head = _column_add(abs(a), b), (f"{abs(a)} + {b}:" if a < 0 else "")
    else:                                       # the magnitudes subtract
        big, small = max(abs(a), b), min(abs(a), b)
        steps = _column_sub(big, small)
        head = "" if (op == "-" and a >= b) else f"{big} - {small}:"
    return " ".join(([head] if head else []) + [". ".join(steps) + "."] +
                    [f"so {_apply(a, op, b)}"])


def _think(thought: str) -> str:
    return f"{THINK_START}{thought}{THINK_END}"


# ----------------------------------------------------------------------------------------------
# arithmetic
# ----------------------------------------------------------------------------------------------


def _chain(rng: random.Random) -> tuple[list[int], list[str]]:
    """2-4 operands; '*' only by a small factor so results stay readable."""
    nums, ops = [rng.randint(2, 99)], []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice("++--*")
        nums.append(rng.randint(2, 9) if op == "*" else rng.randint(1, 99))
        ops.append(op)
    return nums, ops


def _arithmetic(rng: random.Random, think: bool = False) -> tuple[str, str]:
    if rng.random() < 0.25:  # terse drill: answers with no working shown
        lines = []
        for _ in range(rng.randint(6, 12)):
            a, b, op = rng.randint(1, 99), rng.randint(1, 99), rng.choice("+-*")
            if op == "*":
                b = rng.randint(2, 12)
            lines.append(f"{a} {op} {b} = {_apply(a, op, b)}")
        return "\n".join(lines), "medium"
    parts = []
    for k in range(rng.randint(2, 4)):
        nums, ops = _chain(rng)
        expr = str(nums[0])
        for op, n in zip(ops, nums[1:]):
            # Steps run left to right; parenthesise so the written expression means the same.
            expr = f"({expr}) * {n}" if op == "*" and ("+" in expr or "-" in expr) \
                else f"{expr} {op} {n}"
        if rng.random() < 0.5:
            head = f"Problem {k + 1}: {rng.choice(_NAMES)} wants to know {expr}."
        else:
            head = f"Problem {k + 1}: compute {expr}."
        lines, acc = [head], nums[0]
        for step, (op, n) in enumerate(zip(ops, nums[1:]), start=1):
            new = _apply(acc, op, n)  # left to right: every '*' here follows a partial result
            mark = _think(operation_thought(acc, op, n)) if think else ""
            lines.append(f"Step {step}: {acc} {op} {n} ={mark} {new}")
            acc = new
        lines.append(f"Answer: {acc}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts), "high"


# ----------------------------------------------------------------------------------------------
# algebra
# ----------------------------------------------------------------------------------------------
def _algebra(rng: random.Random, think: bool = False) -> tuple[str, str]:
    """Worked linear equations. Thinking style: the isolating steps move into a thought written
    before `x =`, then the check follows as in the worked style."""
    parts = []
    for _ in range(rng.randint(2, 3)):
        var = rng.choice("xyzn")
        x, a, b = rng.randint(-12, 20), rng.randint(2, 9), rng.randint(1, 40)
        if rng.random() < 0.5:  # a*x + b = c
            c = a * x + b
            head = f"Solve for {var}: {a}{var} + {b} = {c}."
            steps = (f"Subtract {b} from both sides: {a}{var} = {c} - {b} = {c - b}.",
                     f"Divide both sides by {a}: {var} = {c - b} / {a} = {x}.")
            isolate = f"{a}{var} = {c} - {b} = {c - b}. {var} = {c - b} / {a} = {x}."
            check = f"Check: {a} * {x} + {b} = {a * x} + {b} = {c}. So {var} = {x}."
        else:  # a*(x - b) = c
            c = a * (x - b)
            head = f"Solve for {var}: {a}({var} - {b}) = {c}."
            steps = (f"Divide both sides by {a}: {var} - {b} = {c} / {a} = {x - b}.",
                     f"Add {b} to both sides: {var} = {x - b} + {b} = {x}.")
            isolate = f"{var} - {b} = {c} / {a} = {x - b}. {var} = {x - b} + {b} = {x}."
            check = f"Check: {a} * ({x} - {b}) = {a} * {x - b} = {c}. So {var} = {x}."
        if think:
            steps = (f"{var} ={_think(f'{isolate} so {x}')} {x}.",)
        parts.append("\n".join((head, *steps, check)))
    return "\n\n".join(parts), "high"


# ----------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------
def _records(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        lines, total = [f"invoice: {rng.randint(1000, 9999)}", f"customer: {rng.choice(_NAMES)}"], 0
        for item in rng.sample(_ITEMS, rng.randint(3, 6)):
            qty, price = rng.randint(1, 9), rng.randint(1, 30)
            total += qty * price
            lines.append(f"item: {item}, qty: {qty}, price: {price}, cost: {qty * price}")
        lines.append(f"total: {total}")
        return "\n".join(lines), "high"
    name, subjects = rng.choice(_NAMES), rng.sample(_SUBJECTS, 4)
    scores = [rng.randint(50, 100) for _ in subjects]
    scores[-1] += (-sum(scores)) % 4  # make the average an integer
    if scores[-1] > 100:
        scores[-1] -= 4
    lines = [f"student: {name}"] + [f"{s}: {v}" for s, v in zip(subjects, scores)]
    lines += [f"sum: {sum(scores)}", "count: 4", f"average: {sum(scores) // 4}"]
    return "\n".join(lines), "high"


# ----------------------------------------------------------------------------------------------
# lists
# ----------------------------------------------------------------------------------------------
def _lists(rng: random.Random) -> tuple[str, str]:
    parts = []
    for _ in range(rng.randint(2, 3)):
        nums = [rng.randint(0, 99) for _ in range(rng.randint(4, 9))]
        fmt = lambda xs: ", ".join(map(str, xs))  # noqa: E731
        parts.append(
            f"Numbers: {fmt(nums)}\nSorted: {fmt(sorted(nums))}\n"
            f"Reversed: {fmt(sorted(nums, reverse=True))}\nCount: {len(nums)}\n"
            f"Min: {min(nums)}\nMax: {max(nums)}\nSum: {sum(nums)}"
        )
    word = rng.choice(("banana", "committee", "mississippi", "letter", "balloon", "coconut"))
    letter = max(sorted(set(word)), key=word.count)
    parts.append(f"Word: {word}. Letters: {len(word)}. Count of {letter}: {word.count(letter)}.")
    return "\n\n".join(parts), "high"


# ----------------------------------------------------------------------------------------------
# textbook (high-quality explanatory prose)
# ----------------------------------------------------------------------------------------------
def _fact(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = 2 * rng.randint(1, 40), 2 * rng.randint(1, 40)
        return (f"The sum of two even numbers is always even. For example, {a} + {b} = {a + b}, "
                f"and {a + b} is even because it is divisible by 2.")
    if kind == 1:
        a, b = rng.randint(2, 9), rng.randint(2, 6)
        rep = " + ".join([str(a)] * b)
        return (f"Multiplication is repeated addition. To find {a} * {b}, add {a} to itself "
                f"{b} times: {rep} = {a * b}. So {a} * {b} = {a * b}.")
    if kind == 2:
        n = rng.randint(100, 999)
        h, t, o = n // 100, n // 10 % 10, n % 10
        return (f"In the number {n}, the digit {h} stands for {h} hundreds, the digit {t} for "
                f"{t} tens and the digit {o} for {o} ones: {h * 100} + {t * 10} + {o} = {n}.")
    if kind == 3:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return (f"Addition is commutative: the order of the numbers does not change the sum. "
                f"{a} + {b} = {a + b} and {b} + {a} = {a + b}.")
    if kind == 4:
        p = rng.choice((2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37))
        c = rng.choice((4, 6, 8, 9, 10, 12, 14, 15, 16, 18, 20, 21))
        d = next(k for k in range(2, c) if c % k == 0)
        return (f"A prime number has exactly two divisors, 1 and itself. {p} is prime. {c} is "
                f"not prime, because {c} = {d} * {c // d}.")
    a, b = rng.randint(20, 99), rng.randint(1, 19)
    return (f"Subtraction undoes addition. If {a} - {b} = {a - b}, then {a - b} + {b} = {a}, "
            f"which is a quick way to check the answer.")


def _textbook(rng: random.Random) -> tuple[str, str]:
    intro = rng.choice((
        "This lesson reviews a few facts about whole numbers.",
        "Here are some properties of numbers, each followed by an example.",
        "Understanding why a rule works makes it easier to remember.",
    ))
    body = " ".join(_fact(rng) for _ in range(rng.randint(3, 5)))
    outro = rng.choice((
        "Try a few examples of your own to check each rule.",
        "Each example can be verified step by step.",
        "With practice these facts become automatic.",
    ))
    return f"{intro} {body} {outro}", "high"


# ----------------------------------------------------------------------------------------------
# web (medium: plain generic prose; low: spam, shouting, word salad)
# ----------------------------------------------------------------------------------------------
_TOPICS = ("the weather", "the local market", "a new cafe", "the football match", "the city park",
           "a road trip", "the school fair", "a garden", "the museum", "a cooking class")
_ADJ = ("quiet", "busy", "pleasant", "crowded", "sunny", "rainy", "friendly", "small", "old", "new")
_VERBS = ("visited", "enjoyed", "talked about", "walked to", "remembered", "described", "liked")
_SPAM = ("click here", "best price", "buy now", "free shipping", "limited offer", "100% free",
         "you won't believe", "subscribe", "top 10", "amazing deal", "act fast", "sign up today")
_SALAD = ("lorem", "ipsum", "thing", "stuff", "very", "so", "really", "good", "nice", "product",
          "online", "cheap", "best", "great", "wow", "page", "more", "info", "home", "login")


def _web(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.45:  # medium
        sents = []
        for _ in range(rng.randint(4, 8)):
            who, topic = rng.choice(_NAMES), rng.choice(_TOPICS)
            sents.append(rng.choice((
                f"{who} {rng.choice(_VERBS)} {topic} on a {rng.choice(_ADJ)} afternoon.",
                f"Many people say {topic} is {rng.choice(_ADJ)} this time of year.",
                f"Last week {who} wrote a short post about {topic}.",
                "It was {} and {}, so {} stayed a little longer.".format(*rng.sample(_ADJ, 2), who),
            )))
        return " ".join(sents), "medium"
    chunks = []
    for _ in range(rng.randint(5, 10)):
        r = rng.random()
        if r < 0.35:
            chunks.append(rng.choice(_SPAM).upper() + "!!!")
        elif r < 0.5:
            chunks.append(f"www.{rng.choice(_SALAD)}-{rng.choice(_SALAD)}{rng.randint(1, 99)}.com")
        else:
            chunks.append(" ".join(rng.choice(_SALAD) for _ in range(rng.randint(3, 9))))
    if rng.random() < 0.5:  # copy-paste repetition, typical of scraped boilerplate
        chunks += chunks[: rng.randint(1, 3)]
    return " ".join(chunks), "low"


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic, "algebra": _algebra, "records": _records,
    "lists": _lists, "textbook": _textbook, "web": _web,
}


# Sources whose generators can write thoughts (the others have no result worth thinking about).
THINKING_SOURCES = ("arithmetic", "algebra")


def generate_document(index: int, seed: int, think_share: float = 0.0) -> dict:
    """Document `index` of the corpus with this seed: {"id", "text", "source", "quality"}, plus
    "thinking": True for a thinking-style document (a `think_share` of the worked arithmetic and
    algebra documents)."""
    rng = _rng(seed, index)
    u, acc = rng.random(), 0.0
    source = _MIX[-1][0]
    for name, share in _MIX:
        acc += share
        if u < acc:
            source = name
            break
    # Its own generator: the documents' other random draws stay the same whatever the share.
    think = (source in THINKING_SOURCES and
             random.Random(f"megatron-rlp-think:{seed}:{index}").random() < think_share)
    text, quality = _GENERATORS[source](rng, think) if source in THINKING_SOURCES \
        else _GENERATORS[source](rng)
    doc = {"id": index, "text": text, "source": source, "quality": quality}
    if think and THINK_START in text:  # a terse drill has no worked steps to think in
        doc["thinking"] = True
    return doc


def generate_corpus(num_docs: int, seed: int, think_share: float = 0.0) -> list[dict]:
    """`num_docs` deterministic documents; see the module docstring for sources, qualities and
    thinking-style documents."""
    if not isinstance(num_docs, int) or num_docs < 0:
        raise ValueError(f"num_docs must be a non-negative int, got {num_docs!r}")
    if not 0.0 <= think_share <= 1.0:
        raise ValueError(f"think_share must be in [0, 1], got {think_share!r}")
    return [generate_document(i, seed, think_share) for i in range(num_docs)]


def strip_thoughts(text: str) -> str:
    """The think-free text of a document: every `<think> ... </think>` span becomes the single
    space the worked style writes there (`=<think>...</think> 82` -> `= 82`)."""
    out, rest = [], text
    while THINK_START in rest:
        head, _, tail = rest.partition(THINK_START)
        _, closed, rest = tail.partition(THINK_END)
        if not closed:
            raise ValueError("a <think> span is never closed")
        out.append(head)
    return "".join(out) + rest


def write_jsonl(docs: Iterable[dict], path: str) -> str:
    """Write one JSON object per line, atomically (temp file in the same folder, then rename).

    A path ending in .gz is gzip-compressed with mtime 0, so equal documents give equal bytes.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # Not mkstemp: its 0600 mode would survive the rename; open(..., "xb") honours the umask.
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "xb") as raw:
            out = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") \
                if path.endswith(".gz") else raw
            for doc in docs:
                out.write(json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n")
            if out is not raw:
                out.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def iter_jsonl(path: str, text_key: str = "text") -> Iterator[tuple[int, dict]]:
    """(line number, document) for each non-blank line of a JSONL file (.gz ok); a line that is not
    a JSON object with a string `text_key` raises ValueError naming `FILE:LINE`."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: bad JSON ({e.args[0][:80]})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get(text_key), str):
                raise ValueError(f"{path}:{n}: expected an object with a string {text_key!r}")
            yield n, doc

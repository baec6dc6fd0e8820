"""The demo task: multi-digit addition with a binary verifier.

A question is ``a+b=`` with non-negative integers a and b; the answer is the decimal sum,
most significant digit first, followed by an end-of-sequence token. The difficulty bucket of a
question is the number of digits of its larger operand: the answer is written left to right, so
every output digit depends on the carry chain below it, and longer operands are harder for a
small model. Questions of a bucket ``k`` have one operand of exactly k digits and the other of
1..k digits (uniform digit count, then uniform value; 1-digit numbers include 0), in random
order.

Held-out split: a question belongs to the test side iff a fixed hash of the *unordered* pair
{a, b} is 0 modulo :data:`TEST_MODULUS`, and to the validation side (for choosing learning
rates) iff it is 1; so ``a+b`` and ``b+a`` are always on the same side and no test or
validation question (or its mirror) is ever trained on. The test set is fixed (independent of
the run's seed); the training stream depends on the seed.

Length setting (``discoloss demo --length``): a response may carry filler tokens (``=``)
between its digits and the end token, which the verifier then ignores (``ignore_filler=True``):
correct answers differ in length while saying the same thing, as a reasoning model's overlong
answers do. The filler follows the digits, so it cannot change them: length and correctness
are decoupled by construction.

Pure Python, no tensors: the verifier is the single source of truth of the reward.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "BOS",
    "EOS",
    "FILLER",
    "PAD",
    "VOCAB",
    "Question",
    "TaskConfig",
    "decode",
    "encode_answer",
    "encode_prompt",
    "is_test_pair",
    "rewards",
    "sample_questions",
    "test_questions",
    "validation_questions",
    "verify",
]

PAD, BOS, EOS = 0, 1, 2
#: Token strings by id: three specials, the ten digits, "+" and "=".
VOCAB: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", *"0123456789", "+", "=")
_ID = {s: i for i, s in enumerate(VOCAB)}
_DIGIT_IDS = frozenset(_ID[d] for d in "0123456789")
#: The filler token of the length setting: ``=`` repeated after the digits.
FILLER = _ID["="]

#: One unordered pair in TEST_MODULUS is held out.
TEST_MODULUS = 8
#: Seed of the held-out set: fixed, so every run evaluates on the same questions.
TEST_SEED = 20250518
#: Seed of the validation set (learning-rate sweep), another residue of the same hash.
VAL_SEED = 20250519

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Question:
    """``a+b=``; a, b >= 0."""

    a: int
    b: int

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def bucket(self) -> int:
        """Difficulty bucket: number of digits of the larger operand."""
        return len(str(max(self.a, self.b)))

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="


@dataclass(frozen=True)
class TaskConfig:
    """Which questions exist.

    buckets: digit counts of the larger operand, one difficulty bucket each (each >= 1).
    test_per_bucket: held-out questions per bucket (distinct, never trained on).
    filler: the length setting: the most filler tokens a demonstration carries after its
      digits; with ``filler > 0`` the verifier ignores filler tokens and the generation budget
      grows by ``filler``. 0 (default): no filler.
    """

    buckets: tuple[int, ...] = (2, 3, 4)
    test_per_bucket: int = 300
    filler: int = 0

    def __post_init__(self) -> None:
        if not self.buckets or any(not isinstance(k, int) or k < 1 for k in self.buckets):
            raise ValueError(f"buckets must be positive digit counts, got {self.buckets!r}")
        if len(set(self.buckets)) != len(self.buckets):
            raise ValueError(f"buckets must be distinct, got {self.buckets!r}")
        if max(self.buckets) > 9:
            raise ValueError(f"buckets: at most 9 digits, got {self.buckets!r}")
        if self.test_per_bucket < 1:
            raise ValueError(f"test_per_bucket must be >= 1, got {self.test_per_bucket}")
        if self.filler < 0:
            raise ValueError(f"filler must be >= 0, got {self.filler}")
        if self.test_per_bucket > _max_test_pairs(min(self.buckets)):
            raise ValueError(
                f"test_per_bucket={self.test_per_bucket} exceeds the held-out questions of "
                f"bucket {min(self.buckets)}"
            )

    @property
    def max_answer_tokens(self) -> int:
        """Generation budget: the longest correct answer (sum digits <= larger digits + 1),
        the end token, and one more token (room for a spurious token before the end); plus
        ``filler`` in the length setting."""
        return max(self.buckets) + 3 + self.filler

    @property
    def ignore_filler(self) -> bool:
        """Whether the verifier ignores filler tokens (the length setting)."""
        return self.filler > 0

    @property
    def max_prompt_tokens(self) -> int:
        return 1 + 2 * max(self.buckets) + 2


def _max_test_pairs(k: int) -> int:
    # Half the expected number of held-out ordered pairs of bucket k (for the config check).
    lo = 0 if k == 1 else 10 ** (k - 1)
    n_large = 10**k - lo
    return int(2 * n_large * 10**k - n_large**2) // (2 * TEST_MODULUS)


def _mix64(x: int) -> int:
    """A fixed 64-bit integer mixer (the finaliser of MurmurHash3)."""
    x &= _MASK64
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _MASK64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _MASK64
    x ^= x >> 33
    return x


def _residue(a: int, b: int) -> int:
    lo, hi = (a, b) if a <= b else (b, a)
    return _mix64(lo * 10_000_000_000 + hi) % TEST_MODULUS


def is_test_pair(a: int, b: int) -> bool:
    """True iff the unordered pair {a, b} is held out (never sampled for training)."""
    return _residue(a, b) == 0


def split_of(a: int, b: int) -> str:
    """ "test", "val" (validation, for learning-rate choice) or "train"."""
    r = _residue(a, b)
    return "test" if r == 0 else "val" if r == 1 else "train"


def _number(rng: random.Random, digits: int) -> int:
    if digits == 1:
        return rng.randrange(10)
    return rng.randrange(10 ** (digits - 1), 10**digits)


def _draw(rng: random.Random, bucket: int) -> Question:
    big = _number(rng, bucket)
    small = _number(rng, rng.randint(1, bucket))
    return Question(big, small) if rng.random() < 0.5 else Question(small, big)


def sample_questions(
    rng: random.Random, n: int, config: TaskConfig, *, split: str = "train"
) -> list[Question]:
    """``n`` questions of ``split`` ("train", "val" or "test"), buckets uniform, drawn with
    ``rng``."""
    if split not in ("train", "val", "test"):
        raise ValueError(
            f"split={split!r} is not a valid option; expected 'train', 'val' or 'test'"
        )
    out: list[Question] = []
    while len(out) < n:
        q = _draw(rng, rng.choice(config.buckets))
        if split_of(q.a, q.b) == split:
            out.append(q)
    return out


def _bucket_questions(k: int) -> list[Question]:
    """Every question of bucket k (only for small k)."""
    lo = 0 if k == 1 else 10 ** (k - 1)
    return [Question(a, b) for a in range(10**k) for b in range(10**k) if max(a, b) >= lo]


def _fixed_set(config: TaskConfig, split: str, seed: int) -> list[Question]:
    rng = random.Random(seed)
    out: list[Question] = []
    for k in config.buckets:
        if split == "val" and k <= 2:
            # the validation residue of a 1- or 2-digit bucket may hold fewer questions than
            # the test side's count: then all of them
            pool = [q for q in _bucket_questions(k) if split_of(q.a, q.b) == split]
            if len(pool) <= config.test_per_bucket:
                out.extend(pool)
                continue
        seen: set[Question] = set()
        while len(seen) < config.test_per_bucket:
            q = _draw(rng, k)
            if split_of(q.a, q.b) == split and q not in seen:
                seen.add(q)
                out.append(q)
    return out


def test_questions(config: TaskConfig) -> list[Question]:
    """The fixed held-out set: ``test_per_bucket`` distinct questions per bucket, bucket order."""
    return _fixed_set(config, "test", TEST_SEED)


def validation_questions(config: TaskConfig) -> list[Question]:
    """The fixed validation set (disjoint from the test set and from training): the test set's
    size per bucket, or every validation question of a bucket that has fewer."""
    return _fixed_set(config, "val", VAL_SEED)


def encode_prompt(q: Question) -> list[int]:
    """``<bos> a + b =`` as token ids."""
    return [BOS, *(_ID[c] for c in q.prompt)]


def encode_answer(q: Question, *, spurious: bool = False, filler: int = 0) -> list[int]:
    """The correct response: the digits of a+b, then ``<eos>``.

    ``spurious=True``: a flawed demonstration with a stray ``=`` before ``<eos>`` (right digits,
    wrong format: :func:`verify` gives it 0). ``filler``: that many filler tokens after the
    digits (the length setting: correct with ``ignore_filler=True``).
    """
    return [
        *(_ID[c] for c in q.answer),
        *((_ID["="],) if spurious else ()),
        *([FILLER] * filler),
        EOS,
    ]


def decode(ids: Iterable[int]) -> str:
    """Token ids to text (specials spelled out); unknown ids raise ValueError."""
    out = []
    for i in ids:
        if not 0 <= i < len(VOCAB):
            raise ValueError(f"ids: token id {i} is outside the vocabulary of {len(VOCAB)}")
        out.append(VOCAB[i])
    return "".join(out)


def verify(q: Question, response: Sequence[int], *, ignore_filler: bool = False) -> float:
    """Binary reward of a sampled response (token ids, as generated).

    1.0 iff the tokens before the first ``<eos>`` are digits spelling exactly ``a+b`` in
    decimal (no sign, no leading zeros, no other token); a response without ``<eos>`` (cut off
    at the length limit) or an empty answer gets 0.0. Tokens after the first ``<eos>`` are
    ignored. ``ignore_filler=True`` (the length setting): filler tokens before ``<eos>`` are
    dropped first, wherever they are.
    """
    try:
        end = list(response).index(EOS)
    except ValueError:
        return 0.0
    body = [t for t in response[:end] if not (ignore_filler and t == FILLER)]
    if not body or any(t not in _DIGIT_IDS for t in body):
        return 0.0
    return 1.0 if decode(body) == q.answer else 0.0


def rewards(
    questions: Sequence[Question],
    responses: Sequence[Sequence[int]],
    *,
    ignore_filler: bool = False,
) -> list[float]:
    """:func:`verify` over aligned lists."""
    if len(questions) != len(responses):
        raise ValueError(
            f"questions and responses must have the same length, got {len(questions)} and "
            f"{len(responses)}"
        )
    return [verify(q, r, ignore_filler=ignore_filler) for q, r in zip(questions, responses)]

"""The prompt generator every task kind shares: a haystack of token ids, needles placed at a depth in tokens.

A prompt is built from token ids, never by re-tokenizing assembled text, so where a needle sits is known
exactly::

    [head: template + instruction] [filler … needle … filler] [tail: question + template + answer prefix]
     ^ BOS when the tokenizer adds one                                     the model continues from here ^

The filler is a window of the haystack text's tokens (cycled when the text is shorter than the prompt),
starting at a seeded word boundary. A needle at depth ``d`` starts after ``round(d · F)`` filler tokens,
``F`` being the filler's length, moved to the nearest word start within :data:`SNAP` tokens so no word is cut
(``d = 0``: before all filler; ``d = 1``: after it). The prompt's length in tokens is exactly the cell's
length. Randomness comes from one ``numpy`` generator per (seed, length, depth, sample), so a cell's prompts
do not change when the grid around it does (the approach of RULER, arXiv 2404.06654 §3, with kvtool's own
templates and haystacks).
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kvtool.errors import InputError

#: A needle moves at most this many tokens from its exact depth, to start at a word boundary.
SNAP = 8
#: The fewest filler tokens a prompt may have.
MIN_FILLER = 16
TEMPLATES = ("auto", "chat", "plain")
_MARK = "\u0000KVTOOL_CONTENT\u0000"
_WORD = re.compile(r"[a-z]{5,12}")


@dataclass(frozen=True)
class Needle:
    """A sentence hidden in the haystack at ``depth`` (fraction of the filler tokens before it)."""

    text: str
    depth: float


@dataclass(frozen=True)
class TaskSample:
    """What a task kind draws for one prompt: ``needles`` (the first is the one asked about, at the cell's
    depth), the ``question``, the expected ``answer`` and the ``answer_prefix`` the reply continues."""

    needles: list[Needle]
    question: str
    answer: str
    answer_prefix: str


class Task(ABC):
    """One task kind: an instruction and a way to draw needles, question and answer.

    Subclasses are dataclasses whose fields are their parameters (validated in :meth:`validate`), like
    codecs; ``words`` handed to :meth:`draw` are distinct words of the haystack text, so keys and variable
    names look like the text around them and the question does not give the answer away.
    """

    name: ClassVar[str]
    instruction: ClassVar[str]

    @abstractmethod
    def validate(self) -> None:
        """InputError naming the allowed values of a bad parameter."""

    @abstractmethod
    def draw(self, rng: np.random.Generator, depth: float, words: Sequence[str]) -> TaskSample:
        """One sample whose asked needle sits at ``depth``."""

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in getattr(self, "__dataclass_fields__", {})}


def number(rng: np.random.Generator, digits: int) -> str:
    """A random ``digits``-digit number as text (no leading zero)."""
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def check_digits(digits: int) -> None:
    if not 2 <= digits <= 12:
        raise InputError(f"digits must be one of 2..12, got {digits}")


# ------------------------------------------------------------------------------------------- haystack


@dataclass
class Haystack:
    """The token ids of a text, which of them start a word, and the text's distinct words."""

    source: str
    ids: np.ndarray  # (T,) int64, no special tokens
    word_start: np.ndarray  # (T,) bool
    words: list[str]
    sha256: str = ""

    @classmethod
    def from_text(cls, tokenizer: Any, text: str, source: str = "text") -> Haystack:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < MIN_FILLER:
            raise InputError(f"{source}: the haystack text has {len(ids)} tokens; give a text of at least "
                             f"{MIN_FILLER} tokens (it is repeated to fill longer prompts)")
        pieces = tokenizer.batch_decode([[i] for i in ids])
        starts = np.array([p[:1].isspace() or p[:1] in "\n\r" for p in pieces], dtype=bool)
        starts[1:] |= np.array([p.endswith("\n") for p in pieces[:-1]], dtype=bool)
        words = sorted(set(_WORD.findall(text.lower())))
        if len(words) < 16:
            raise InputError(f"{source}: the haystack has {len(words)} distinct words of 5-12 letters; the tasks "
                             "draw keys and variable names from them and need at least 16")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return cls(source, np.asarray(ids, dtype=np.int64), starts, words, digest)

    def filler(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` consecutive token ids (and their word-start flags) from a random word start, cycling."""
        starts = np.flatnonzero(self.word_start)
        first = int(rng.choice(starts)) if len(starts) else int(rng.integers(len(self.ids)))
        index = (first + np.arange(n)) % len(self.ids)
        return self.ids[index], self.word_start[index]


# ------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """How content is wrapped: ``head`` + content + ``tail`` (text), ``head`` tokenized with special tokens."""

    kind: str
    head: str
    tail: str


def make_template(tokenizer: Any, kind: str = "auto") -> Template:
    """The model's chat template around the user's content (``chat``) or the content alone (``plain``);
    ``auto`` picks ``chat`` when the tokenizer has a chat template."""
    if kind not in TEMPLATES:
        raise InputError(f"--template must be one of {', '.join(TEMPLATES)}, got {kind!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if kind == "chat" and not has_chat:
        raise InputError("--template chat: the model's tokenizer has no chat template; use --template plain")
    if kind == "plain" or (kind == "auto" and not has_chat):
        return Template("plain", "", "\n")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                         add_generation_prompt=True)
    head, _, tail = text.partition(_MARK)
    return Template("chat", head, tail)


# --------------------------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """One prompt of the grid: token ``ids`` ``(length,)``, the expected ``answer``, and where the asked
    needle starts (``needle_position``, a token index into ``ids``; ``needle_depth``: the depth it got)."""

    length: int
    depth: float
    sample: int
    ids: np.ndarray
    answer: str
    needle_position: int
    needle_depth: float
    haystack_span: tuple[int, int]
    question: str = ""
    needle_positions: list[int] = field(default_factory=list)  # every needle's first token, in draw order
    needle_lengths: list[int] = field(default_factory=list)  # and its length in tokens


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def _snap(target: int, starts: np.ndarray) -> int:
    """The word start (index into the filler; ``len(starts)`` = the end) nearest to ``target``."""
    n = len(starts)
    if target <= 0 or target >= n:
        return min(max(target, 0), n)
    for off in range(SNAP + 1):
        for k in (target - off, target + off):
            if 0 <= k < n and starts[k]:
                return k
    return target


def build_prompt(tokenizer: Any, task: Task, haystack: Haystack, template: Template, length: int, depth: float,
                 sample: int, seed: int) -> Prompt:
    """The prompt of one grid cell's ``sample``: exactly ``length`` tokens, the asked needle at ``depth``."""
    rng = np.random.default_rng([seed, length, round(depth * 10_000), sample])
    drawn = task.draw(rng, depth, haystack.words)
    head = _encode(tokenizer, template.head + task.instruction + "\n\n", special=True)
    tail_text = "\n\n" + drawn.question + template.tail + drawn.answer_prefix
    tail = _encode(tokenizer, tail_text)
    needles = [_encode(tokenizer, " " + n.text) for n in drawn.needles]
    n_filler = length - len(head) - len(tail) - sum(len(n) for n in needles)
    if n_filler < MIN_FILLER:
        raise InputError(f"length {length} leaves {n_filler} haystack tokens after the {task.name} task's "
                         f"template, needles and question ({length - n_filler} tokens); give lengths of at "
                         f"least {length - n_filler + MIN_FILLER}")
    filler, starts = haystack.filler(rng, n_filler)
    cuts = [_snap(round(n.depth * n_filler), starts) for n in drawn.needles]
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    ids: list[int] = list(head)
    positions = [0] * len(needles)
    prev = 0
    for i in order:
        ids.extend(filler[prev:cuts[i]].tolist())
        positions[i] = len(ids)
        ids.extend(needles[i])
        prev = cuts[i]
    ids.extend(filler[prev:].tolist())
    span = (len(head), len(ids))
    ids.extend(tail)
    return Prompt(length, depth, sample, np.asarray(ids, dtype=np.int64), drawn.answer, positions[0],
                  cuts[0] / n_filler, span, drawn.question, positions,
                  [len(n) for n in needles])


def build_prompts(tokenizer: Any, task: Task, haystack: Haystack, lengths: Sequence[int], depths: Sequence[float],
                  samples: int, seed: int = 0, template: str | Template = "auto") -> list[Prompt]:
    """Every prompt of the grid, lengths outer, depths, then samples inner."""
    check_grid(lengths, depths, samples)
    task.validate()
    tpl = template if isinstance(template, Template) else make_template(tokenizer, template)
    return [build_prompt(tokenizer, task, haystack, tpl, n, d, s, seed)
            for n in lengths for d in depths for s in range(samples)]


def check_grid(lengths: Sequence[int], depths: Sequence[float], samples: int) -> None:
    if not lengths:
        raise InputError("give at least one length (--lengths 1k,2k)")
    if not depths:
        raise InputError("give at least one depth (--depths 0,0.5,1)")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise InputError(f"depths must lie in 0..1 (fractions of the haystack), got {d:g}")
    for n in lengths:
        if n < 1:
            raise InputError(f"lengths must be positive token counts, got {n}")
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")


def parse_lengths(text: str) -> list[int]:
    """``"1k,2k,4096"`` -> ``[1024, 2048, 4096]`` (``k`` = 1024 tokens)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kK]?)", part)
        if not m:
            raise InputError(f"--lengths: {part!r} is not a token count; use e.g. 1k,2k,4096")
        value = float(m.group(1)) * (1024 if m.group(2) else 1)
        if value != int(value) or value < 1:
            raise InputError(f"--lengths: {part!r} is not a whole positive number of tokens")
        out.append(int(value))
    return out


def parse_depths(text: str) -> list[float]:
    """``"0,0.25,0.5"`` -> ``[0.0, 0.25, 0.5]``, each in 0..1."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"--depths: {part!r} is not a number in 0..1") from None
        if not 0.0 <= value <= 1.0:
            raise InputError(f"--depths: {part} is outside 0..1 (a fraction of the haystack)")
        out.append(value)
    return out

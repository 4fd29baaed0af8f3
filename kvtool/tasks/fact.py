"""``fact``: a needle stated as a fact about a key word, "the special magic number for X is N" (RULER's
single needle, arXiv 2404.06654 §3.1, with the key drawn from the haystack's own words)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvtool.tasks.core import Needle, Task, TaskSample, check_digits, number

INSTRUCTION = ("Some special magic numbers are hidden inside the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.")


def magic_needle(key: str, value: str, depth: float) -> Needle:
    return Needle(f"One of the special magic numbers for {key} is: {value}.", depth)


def magic_question(key: str) -> tuple[str, str]:
    """(question, answer prefix) asking for ``key``'s number."""
    return (f"What is the special magic number for {key} mentioned in the provided text? "
            "Answer with the number only.",
            f"The special magic number for {key} mentioned in the provided text is")


@dataclass
class Fact(Task):
    """``fact:digits=6`` — one "special magic number for KEY" (KEY a word of the text); asked for it."""

    name = "fact"
    instruction = INSTRUCTION
    digits: int = 6

    def validate(self) -> None:
        check_digits(self.digits)

    def draw(self, rng: np.random.Generator, depth: float, words: Sequence[str]) -> TaskSample:
        key = str(rng.choice(words))
        value = number(rng, self.digits)
        question, prefix = magic_question(key)
        return TaskSample([magic_needle(key, value, depth)], question, value, prefix)

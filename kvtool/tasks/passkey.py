"""``passkey``: one pass key hidden in the text (Mohtashami & Jaggi, arXiv 2305.16300 §4.1; RULER's form)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvtool.tasks.core import Needle, Task, TaskSample, check_digits, number


@dataclass
class Passkey(Task):
    """``passkey:digits=5`` — a ``digits``-digit pass key stated once; the model is asked for it."""

    name = "passkey"
    instruction = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize "
                   "it. I will quiz you about the pass key.")
    digits: int = 5

    def validate(self) -> None:
        check_digits(self.digits)

    def draw(self, rng: np.random.Generator, depth: float, words: Sequence[str]) -> TaskSample:
        key = number(rng, self.digits)
        needle = Needle(f"The pass key is {key}. Remember it. {key} is the pass key.", depth)
        return TaskSample([needle], "What is the pass key? Answer with the number only.", key, "The pass key is")

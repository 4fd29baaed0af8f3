"""``multikey``: several "special magic number for X" needles with different keys; one is asked (RULER's
multi-key NIAH, arXiv 2404.06654 §3.1). The other needles are the distractors: same form, keys drawn from
the haystack's words, so only reading the right one answers the question."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvtool.errors import InputError
from kvtool.tasks.core import Task, TaskSample, check_digits, number
from kvtool.tasks.fact import INSTRUCTION, magic_needle, magic_question


@dataclass
class MultiKey(Task):
    """``multikey:keys=4,digits=6`` — ``keys`` needles (one asked at the cell's depth, the others at random
    depths)."""

    name = "multikey"
    instruction = INSTRUCTION
    keys: int = 4
    digits: int = 6

    def validate(self) -> None:
        check_digits(self.digits)
        if not 2 <= self.keys <= 32:
            raise InputError(f"keys must be one of 2..32, got {self.keys}")

    def draw(self, rng: np.random.Generator, depth: float, words: Sequence[str]) -> TaskSample:
        keys = [str(w) for w in rng.choice(words, size=self.keys, replace=False)]
        values: list[str] = []
        while len(values) < self.keys:
            v = number(rng, self.digits)
            if v not in values:
                values.append(v)
        depths = [depth, *rng.uniform(0.0, 1.0, size=self.keys - 1).tolist()]
        needles = [magic_needle(k, v, d) for k, v, d in zip(keys, values, depths, strict=True)]
        question, prefix = magic_question(keys[0])
        return TaskSample(needles, question, values[0], prefix)

"""``vartrack``: variable tracking across the context (RULER's VT, arXiv 2404.06654 §3.2, asked for one
chain's value rather than for all its names, so the answer is one number and exact match scores it).

``VAR A = N`` sits at the cell's depth; ``VAR B = VAR A``, ``VAR C = VAR B`` … (``hops`` assignments) at
random depths elsewhere; a distractor chain with another number and other names is spread the same way.
The question asks for the value of the asked chain's last variable, so the model must find and follow every
link. Variable names are words of the haystack in capitals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvtool.errors import InputError
from kvtool.tasks.core import Needle, Task, TaskSample, check_digits, number


@dataclass
class VarTrack(Task):
    """``vartrack:hops=2,chains=2,digits=5`` — follow ``hops`` assignments from a number to the asked
    variable; ``chains - 1`` distractor chains."""

    name = "vartrack"
    instruction = ("Memorize and track the chain(s) of variable assignments hidden in the following text. "
                   "I will ask you for the value of a variable afterwards.")
    hops: int = 2
    chains: int = 2
    digits: int = 5

    def validate(self) -> None:
        check_digits(self.digits)
        if not 1 <= self.hops <= 8:
            raise InputError(f"hops must be one of 1..8, got {self.hops}")
        if not 1 <= self.chains <= 8:
            raise InputError(f"chains must be one of 1..8, got {self.chains}")

    def draw(self, rng: np.random.Generator, depth: float, words: Sequence[str]) -> TaskSample:
        n_names = self.chains * (self.hops + 1)
        names = [str(w).upper() for w in rng.choice(words, size=n_names, replace=False)]
        needles: list[Needle] = []
        asked = ""
        answer = ""
        for c in range(self.chains):
            chain = names[c * (self.hops + 1):(c + 1) * (self.hops + 1)]
            value = number(rng, self.digits)
            while c and value == answer:
                value = number(rng, self.digits)
            first = depth if c == 0 else float(rng.uniform())
            needles.append(Needle(f"VAR {chain[0]} = {value}.", first))
            for a, b in zip(chain, chain[1:], strict=False):
                needles.append(Needle(f"VAR {b} = VAR {a}.", float(rng.uniform())))
            if c == 0:
                asked, answer = chain[-1], value
        return TaskSample(needles, f"What is the numeric value of VAR {asked}? Answer with the number only.",
                          answer, f"The numeric value of VAR {asked} is")

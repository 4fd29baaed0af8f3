"""kvtool's own calls into transformers raise no FutureWarning or DeprecationWarning on the locked release.

A renamed argument (5.24's ``past_key_values`` -> ``cache``) first shows up as such a warning; turning them into
errors here makes the next rename fail this test rather than a user's run months later.
"""

from __future__ import annotations

import logging
import warnings

import pytest

from kvtool.cache import CodecCache
from kvtool.capture import TextInput, capture
from kvtool.codecs.assignment import Assignment
from kvtool.compat import generate_cache_kwarg
from kvtool.evaluate import evaluate, tokenize_text

pytestmark = pytest.mark.model

DEPRECATIONS = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)


def _deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
            if issubclass(w.category, DEPRECATIONS)]


class _Deprecations(logging.Handler):
    """transformers also announces deprecations through its logger (``logger.warning_once``)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecat" in record.getMessage().lower():
            self.messages.append(f"{record.name}: {record.getMessage()}")


def test_capture_eval_codec_cache_and_generate_raise_no_deprecation(smollm, tmp_path):
    import torch

    tokens = tokenize_text(smollm, "samples/apache-2.0.txt", 64)
    logged = _Deprecations()
    logging.getLogger("transformers").addHandler(logged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capture(smollm, [TextInput("t", "Keys and values stay in every layer's cache. " * 3)], tmp_path / "c.h5",
                queries="last:4")
        evaluate(smollm, tokens, [Assignment.of("turboquant:bits=3", "turboquant:bits=3")], context=32)
        ids = torch.as_tensor(tokens[None, :16], device=smollm.device)
        for mode in ("prefill", "streaming"):
            cache = CodecCache(smollm.model, "kivi:bits=2", mode=mode)
            smollm.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                  **{generate_cache_kwarg(): cache})
    logging.getLogger("transformers").removeHandler(logged)
    assert not _deprecations(caught), "\n".join(_deprecations(caught))
    assert not logged.messages, "\n".join(logged.messages)

"""What differs between the transformers releases kvtool admits (``pyproject.toml``), in one place.

transformers 5.24.0 renamed the model cache from ``past_key_values`` to ``cache``: the keyword of
``forward``, ``generate`` and ``prepare_inputs_for_generation``, and the field of every model output.
The old keyword still works, with a deprecation warning, until 5.40 for ``forward`` (6.0 for
``generate``); reading ``output.past_key_values`` warns too. 5.23 and earlier know only
``past_key_values``. Every place kvtool passes or reads a model's cache goes through these helpers, so
the current name is used where it exists and nothing warns on either side of the rename.

    from kvtool.compat import forward_cache_kwarg, generate_cache_kwarg, output_cache

    out = model(input_ids=ids, use_cache=True, **{forward_cache_kwarg(model): cache})
    cache = output_cache(out)
    model.generate(ids, **{generate_cache_kwarg(): cache})
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator
from typing import Any

CACHE_NAME = "cache"  # transformers >= 5.24
LEGACY_CACHE_NAME = "past_key_values"  # transformers < 5.24 (deprecated after)


@functools.cache
def library_cache_name() -> str:
    """The cache's name in the installed transformers: ``"cache"`` from 5.24 on, else ``"past_key_values"``.

    Read from the fields of the causal-LM output class rather than from the version string, so that
    development builds between releases are judged by what they do.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CACHE_NAME if CACHE_NAME in CausalLMOutputWithPast.__dataclass_fields__ else LEGACY_CACHE_NAME


def forward_cache_kwarg(model: Any) -> str:
    """The keyword that passes a ``Cache`` to ``model(...)`` / ``model.forward``.

    The model's own signature decides: a remote-code model may keep ``past_key_values`` on a transformers
    that renamed it. A forward that names neither (only ``**kwargs``) gets the library's name.
    """
    params = inspect.signature(model.forward).parameters
    for name in (CACHE_NAME, LEGACY_CACHE_NAME):
        if name in params:
            return name
    return library_cache_name()


def generate_cache_kwarg() -> str:
    """The keyword that passes a ``Cache`` to ``model.generate(...)`` (generate takes it through ``**kwargs``)."""
    return library_cache_name()


def output_cache(output: Any) -> Any | None:
    """The ``Cache`` that a forward or generate output carries, or None when it holds none.

    Reads the field under whichever name the output class declares, without touching the deprecated
    alias (which would log a warning on transformers >= 5.24).
    """
    keys = list(output.keys()) if hasattr(output, "keys") else []  # a plain list: `in` on the view warns
    for name in (CACHE_NAME, LEGACY_CACHE_NAME):
        if name in keys:
            return output[name]
    return None


#: transformers' switch (5.25 on) that makes its sdpa attention pass grouped-query keys and values to torch
#: as they are (``enable_gqa=True``) instead of repeating each kv head for its group (``repeat_kv``)
FORCE_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def grouped_sdpa(device: Any) -> Iterator[None]:
    """Within the context, transformers' sdpa attention on ``device`` leaves grouped-query heads grouped.

    By default it repeats each kv head for the query heads of its group whenever there is a mask (any
    cached pass): a transient of ``group × cache`` per layer, 38 MiB at 8k for SmolLM2's 3 → 9 heads. On
    the CPU torch's sdpa takes the mask with ``enable_gqa=True`` and gives the same output bit for bit
    (``tests/test_compat.py``); on CUDA a mask with ``enable_gqa`` falls back to the math kernel, so only
    CPU passes are switched. Releases without the switch ignore it. A value the user set is left alone.
    """
    if _device_type(device) != "cpu" or FORCE_GQA_ENV in os.environ:
        yield
        return
    os.environ[FORCE_GQA_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(FORCE_GQA_ENV, None)


def _device_type(device: Any) -> str:
    """``"cpu"``, ``"cuda"``, … of a device, a device string or a tensor's device."""
    return str(getattr(device, "type", device)).split(":")[0]

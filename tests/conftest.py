"""Shared fixtures: the bundled model (loaded once per session) and tiny random models of other families."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm():
    """The bundled SmolLM2-135M-Instruct (GGUF), loaded once for the whole session."""
    from kvtool.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def tokenizer_dir(smollm, tmp_path_factory) -> Path:
    """A folder holding only the bundled model's tokenizer, to pair with random tiny models."""
    d = tmp_path_factory.mktemp("tokenizer")
    smollm.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_factory(tokenizer_dir, tmp_path_factory):
    """Build a random-initialised model folder from a transformers config: factory(config) -> Path."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    def make(config, name: str) -> Path:
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(name)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(d)
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, d / f.name)
        return d

    return make


@pytest.fixture
def test_selectors():
    """Register the test-only selectors of tests/_selectors.py (``droprange``, ``keepfirst``) for one test."""
    from _selectors import DropRange, KeepFirst

    from kvtool.codecs import REGISTRY

    REGISTRY["droprange"] = DropRange
    REGISTRY["keepfirst"] = KeepFirst
    yield
    REGISTRY.pop("droprange")
    REGISTRY.pop("keepfirst")

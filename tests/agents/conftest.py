"""Fixtures of the LLM agent tests: a fake provider that answers like a model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from evo_compress_doubles.providers import FakeProviderServer, model_like


@pytest.fixture
def fake_llm() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(default=model_like()) as server:
        yield server

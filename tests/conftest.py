"""Shared fixtures: tiny random models on every backend, and the demo model (session-scoped)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from typing import Any

import pytest
import torch

from steerx_lens.backends import available_backends
from steerx_lens.models import load_demo_model, load_tiny_model

BACKENDS = available_backends()  # all four, or three with TransformerLens 4 (no HookedTransformer)

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Any]:
    """The same tiny random Llama model loaded on each backend."""
    return {backend: load_tiny_model(backend) for backend in BACKENDS}


@pytest.fixture(scope="session", params=BACKENDS)
def tiny_model(request: pytest.FixtureRequest, tiny_models: dict[str, Any]) -> Any:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Any]:
    """The demo model (SmolLM2-135M-Instruct) loaded on each backend."""
    return {backend: load_demo_model(backend) for backend in BACKENDS}

"""What changes with TransformerLens 4.x (run here and by scripts/check_transformer_lens_4.sh)."""

from __future__ import annotations

import importlib.metadata

import pytest

from steerx_lens.backends import available_backends
from steerx_lens.errors import BackendError
from steerx_lens.models import load_tiny_model

TL_MAJOR = int(importlib.metadata.version("transformer-lens").split(".")[0])


def test_available_backends_follow_the_transformer_lens_version() -> None:
    expected = {"hf", "bridge", "nnsight"} | ({"transformer_lens"} if TL_MAJOR < 4 else set())
    assert set(available_backends()) == expected


@pytest.mark.skipif(TL_MAJOR < 4, reason="HookedTransformer exists in TransformerLens 3.x")
def test_hooked_transformer_is_refused_with_a_clear_error_on_tl4() -> None:
    with pytest.raises(BackendError, match="TransformerLens 3.x.*bridge"):
        load_tiny_model("transformer_lens")

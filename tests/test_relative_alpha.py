"""Strength relative to the residual norm: ``SteeringVector.residual_norm`` and ``relative_alpha``.

``relative_alpha(f)`` must give ``‖alpha·v‖ = f·residual_norm``; the norm is kept in vector
files (old files without it still load) and GGUF exports; an unknown norm is a clear error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import steerx_lens.hooks as hooks
from steerx_lens.backbones.mean_diff import mean_diff_vector, residual_norm
from steerx_lens.backends import get_adapter
from steerx_lens.errors import ResidualNormError, SteerXError
from steerx_lens.models import load_tiny_model
from steerx_lens.vectors import METADATA_KEY, SteeringVector, SteeringVectorSet, VectorFileError

SITE = "blocks.1.hook_resid_post"
TEXTS = ["Cheers, Sam! I love hoppy beers.", "Health news: sleep well tonight."]


@pytest.fixture(scope="module")
def model() -> Any:
    torch.set_num_threads(1)
    return load_tiny_model("hf")


def vector(
    model: Any, norm: float | None = 40.0, site: str = SITE, seed: int = 0
) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector(
        vector=torch.randn(64, generator=generator),
        site=site,
        model_fingerprint=get_adapter(model).fingerprint(),
        residual_norm=norm,
    )


@pytest.mark.parametrize("fraction", [0.05, 0.5, 2.0, -0.25])
def test_relative_alpha_gives_the_stated_norm_ratio(model: Any, fraction: float) -> None:
    v = vector(model)
    alpha = v.relative_alpha(fraction)
    assert math.isclose(
        (alpha * v.vector).norm().item() / v.residual_norm, abs(fraction), rel_tol=1e-5
    )
    assert math.copysign(1.0, alpha) == math.copysign(1.0, fraction)
    scaled = v.scaled_to(fraction)
    assert scaled.alpha == alpha and torch.equal(scaled.vector, v.vector)
    assert v.to_steer(relative=fraction).alpha == alpha


def test_relative_strength_on_the_models_own_norm(model: Any) -> None:
    """With the norm measured by ``mean_diff.residual_norm``, the added activation has exactly
    the asked share of the typical residual norm, and steering equals the absolute alpha."""
    norm = residual_norm(model, SITE, TEXTS)
    direction = mean_diff_vector(model, SITE, TEXTS[:1], TEXTS[1:])
    v = SteeringVector(direction, SITE, get_adapter(model).fingerprint(), residual_norm=norm)
    alpha = v.relative_alpha(0.2)
    assert math.isclose(float((alpha * v.vector).norm()), 0.2 * norm, rel_tol=1e-5)
    with v.apply(model, relative=0.2, positions="all"):
        relative = hooks.run(model, TEXTS)
    absolute = hooks.run(model, TEXTS, hooks.Steer(SITE, direction, alpha=alpha, positions="all"))
    assert float((relative - absolute).abs().max()) < 1e-6
    assert float((relative - hooks.run(model, TEXTS)).abs().max()) > 1e-3
    assert v.generate(model, TEXTS, relative=0.2, max_new_tokens=3) == v.generate(
        model, TEXTS, alpha=alpha, max_new_tokens=3
    )


def test_unknown_norm_zero_vector_and_both_strengths_are_clear_errors(model: Any) -> None:
    with pytest.raises(ResidualNormError, match="residual_norm") as error:
        vector(model, norm=None).relative_alpha(0.1)
    assert "\n" not in str(error.value) and isinstance(error.value, SteerXError)
    with pytest.raises(ResidualNormError):
        vector(model, norm=None).to_steer(relative=0.1)
    zero = SteeringVector(
        torch.zeros(64), SITE, get_adapter(model).fingerprint(), residual_norm=3.0
    )
    with pytest.raises(ResidualNormError, match="zero"):
        zero.relative_alpha(0.1)
    with pytest.raises(ValueError, match="not both"):
        vector(model).to_steer(alpha=1.0, relative=0.1)
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ResidualNormError):
            vector(model, norm=bad)


def test_norm_is_saved_and_old_files_still_load(model: Any, tmp_path: Path) -> None:
    v = vector(model, norm=42.5)
    back = SteeringVector.load(v.save(tmp_path / "v.safetensors"), model)
    assert back.residual_norm == 42.5
    assert back.relative_alpha(0.1) == v.relative_alpha(0.1)
    # a vector without a norm writes no key: its file is byte for byte the old format
    plain = vector(model, norm=None)
    path = plain.save(tmp_path / "plain.safetensors")
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
    assert "residual_norm" not in meta
    assert SteeringVector.load(path).residual_norm is None
    # a file from before the field existed (hand-written metadata without it)
    old = tmp_path / "old.safetensors"
    save_file({"vector": plain.vector}, str(old), metadata={METADATA_KEY: json.dumps(meta)})
    assert SteeringVector.load(old).residual_norm is None
    # a recorded norm that is not > 0 is refused in one line
    bad = tmp_path / "bad.safetensors"
    save_file(
        {"vector": plain.vector},
        str(bad),
        metadata={METADATA_KEY: json.dumps({**meta, "residual_norm": -3.0})},
    )
    with pytest.raises(VectorFileError, match="residual_norm") as error:
        SteeringVector.load(bad)
    assert "\n" not in str(error.value)


def test_norm_survives_arithmetic_sets_and_gguf(model: Any, tmp_path: Path) -> None:
    from steerx_lens.interop import export_gguf, import_gguf

    v = vector(model, norm=10.0)
    assert (v * 2.0).residual_norm == 10.0 and v.normalized().residual_norm == 10.0
    model3 = load_tiny_model("hf", n_layers=3)
    fingerprint = get_adapter(model3).fingerprint()
    vectors = SteeringVectorSet(
        [
            SteeringVector(
                torch.ones(64), "blocks.1.hook_resid_post", fingerprint, residual_norm=8.0
            ),
            SteeringVector(
                torch.ones(64), "blocks.2.hook_resid_post", fingerprint, residual_norm=32.0
            ),
        ]
    )
    alphas = [steer.alpha for steer in vectors.to_steers(relative=0.5)]
    assert alphas == [0.5 * 8.0 / 8.0, 0.5 * 32.0 / 8.0]  # each site's own norm (‖v‖ = 8)
    assert [v.alpha for v in vectors.scaled_to(0.5)] == alphas
    back = import_gguf(export_gguf(vectors, tmp_path / "v.gguf", model_hint="llama"), model3)
    assert [b.residual_norm for b in back] == [8.0, 32.0]

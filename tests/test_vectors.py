"""SteeringVector: metadata, arithmetic, safetensors files and model checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from steerx_lens import hooks
from steerx_lens.backends import get_adapter
from steerx_lens.errors import ModelMismatchError, NonFiniteError, VectorShapeError
from steerx_lens.models import load_tiny_model
from steerx_lens.vectors import FORMAT_VERSION, SteeringVector, VectorFileError


@pytest.fixture(scope="module")
def model() -> Any:
    return load_tiny_model("hf")


def make(model: Any, seed: int = 0, **kwargs: Any) -> SteeringVector:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(seed))
    fingerprint = get_adapter(model).fingerprint()
    return SteeringVector(vector, "blocks.1.hook_resid_post", fingerprint, **kwargs)


def test_save_load_round_trip_is_bit_identical(model: Any, tmp_path: Path) -> None:
    original = make(
        model,
        backbone="bipo",
        mode="steerx",
        alpha=0.7,
        user_id="u1",
        description="Signs off with 'Cheers, Sam!'",
        extra={"r": 0.05, "layers": [1]},
    )
    path = original.save(tmp_path / "v.safetensors")
    loaded = SteeringVector.load(path, model=model)
    assert torch.equal(loaded.vector, original.vector)
    assert loaded.metadata() == original.metadata()
    assert loaded.layer == 1 and loaded.d_model == 64
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temp file left


def test_loading_on_another_model_fails_clearly(model: Any, tmp_path: Path) -> None:
    path = make(model).save(tmp_path / "v.safetensors")
    other_width = load_tiny_model("hf", d_model=32)
    with pytest.raises(ModelMismatchError, match="made on model 2x64"):
        SteeringVector.load(path, model=other_width)
    other_weights = load_tiny_model("hf", seed=1)
    with pytest.raises(ModelMismatchError):
        SteeringVector.load(path, model=other_weights)
    with pytest.raises(ModelMismatchError):
        hooks.run(other_weights, "hello", make(model).to_steer())


@pytest.mark.parametrize("keep", [0, 8, 60, -5])
def test_truncated_file_fails_cleanly(model: Any, tmp_path: Path, keep: int) -> None:
    path = make(model).save(tmp_path / "v.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(VectorFileError):
        SteeringVector.load(path)


def test_newer_format_and_foreign_files_are_rejected(model: Any, tmp_path: Path) -> None:
    meta = make(model).metadata()
    meta["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.safetensors"
    save_file({"vector": torch.zeros(64)}, str(newer), metadata={"steerx": json.dumps(meta)})
    with pytest.raises(VectorFileError, match="upgrade"):
        SteeringVector.load(newer)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(VectorFileError, match="not a steerx_lens vector"):
        SteeringVector.load(foreign)
    with pytest.raises(VectorFileError, match="no vector file"):
        SteeringVector.load(tmp_path / "missing.safetensors")


def test_arithmetic_and_steer_conversion(model: Any) -> None:
    a, b = make(model, 0), make(model, 1)
    assert torch.allclose((a + b).vector, a.vector + b.vector)
    assert torch.allclose((a - b).vector, a.vector - b.vector)
    assert torch.allclose((2 * a).vector, 2 * a.vector) and torch.allclose((-a).vector, -a.vector)
    assert abs(a.normalized().norm() - 1.0) < 1e-6
    assert abs(a.cosine(a) - 1.0) < 1e-6
    steer = a.to_steer(alpha=3.0)
    assert steer.alpha == 3.0 and steer.model_fingerprint == a.model_fingerprint
    assert (hooks.run(model, "hello", steer) - hooks.run(model, "hello")).abs().max() > 1e-3
    elsewhere = SteeringVector(b.vector, "blocks.0.hook_resid_post", b.model_fingerprint)
    with pytest.raises(ModelMismatchError):
        a + elsewhere


def test_bad_vectors_are_refused(model: Any) -> None:
    fingerprint = get_adapter(model).fingerprint()
    with pytest.raises(NonFiniteError):
        SteeringVector(torch.full((64,), float("nan")), "blocks.0.hook_resid_post", fingerprint)
    with pytest.raises(VectorShapeError, match="width 32"):
        SteeringVector(torch.zeros(32), "blocks.0.hook_resid_post", fingerprint)
    with pytest.raises(VectorShapeError):
        SteeringVector(torch.zeros(2, 64), "blocks.0.hook_resid_post", fingerprint)
    with pytest.raises(VectorShapeError, match="zero vector"):
        SteeringVector(torch.zeros(64), "blocks.0.hook_resid_post", fingerprint).normalized()


def write_vector_file(path: Path, meta: Any, tensor: torch.Tensor | None = None) -> Path:
    """A vector file with the given metadata (any JSON) and tensor (default: 64 ones)."""
    tensor = torch.ones(64) if tensor is None else tensor
    save_file({"vector": tensor}, str(path), metadata={"steerx": json.dumps(meta)})
    return path


def test_unknown_metadata_keys_are_tolerated_with_a_warning(model: Any, tmp_path: Path) -> None:
    meta = {**make(model).metadata(), "created": 1795734650.86}  # as written before 0.2
    future = write_vector_file(tmp_path / "future.safetensors", {**meta, "temperature": 0.7})
    with pytest.warns(UserWarning, match=r"unknown metadata key\(s\) \['temperature'\]"):
        loaded = SteeringVector.load(future, model=model)
    assert loaded.metadata() == meta and loaded.created == 1795734650.86


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"site": None}, "'site' has the wrong type"),
        ({"alpha": "strong"}, "'alpha' has the wrong type"),
        ({"alpha": float("nan")}, "'alpha' is not finite"),
        ({"extra": [1]}, "'extra' has the wrong type"),
        ({"d_model": True}, "'d_model' has the wrong type"),
        ({"model_fingerprint": "garbage"}, "malformed model fingerprint"),
        ({"d_model": 32}, "width 64, the metadata says float32 of width 32"),
        ({"dtype": "float16"}, "the tensor is float32 of width 64, the metadata says float16"),
    ],
)
def test_mistyped_or_inconsistent_metadata_is_refused(
    model: Any, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    meta = {**make(model).metadata(), **change}
    with pytest.raises(VectorFileError, match=message.replace("(", r"\(")):
        SteeringVector.load(write_vector_file(tmp_path / "v.safetensors", meta))


@pytest.mark.parametrize("key", ["site", "mode", "alpha", "extra", "library_version", "dtype"])
def test_missing_metadata_keys_are_refused(model: Any, tmp_path: Path, key: str) -> None:
    meta = {k: v for k, v in make(model).metadata().items() if k != key}
    with pytest.raises(VectorFileError, match=rf"key\(s\) \['{key}'\] missing"):
        SteeringVector.load(write_vector_file(tmp_path / "v.safetensors", meta))


def test_tensors_that_disagree_with_the_header_are_refused(model: Any, tmp_path: Path) -> None:
    meta = make(model).metadata()
    half = write_vector_file(tmp_path / "half.safetensors", meta, torch.ones(64).half())
    with pytest.raises(VectorFileError, match="the tensor is float16"):
        SteeringVector.load(half)
    ints = {**meta, "dtype": "int64"}
    integer = write_vector_file(tmp_path / "int.safetensors", ints, torch.ones(64).long())
    with pytest.raises(VectorFileError, match="1-D floating point"):
        SteeringVector.load(integer)
    narrow = {**meta, "d_model": 32}  # consistent header, but not the fingerprint's width
    with pytest.raises(VectorFileError, match="fingerprint"):
        SteeringVector.load(write_vector_file(tmp_path / "n.safetensors", narrow, torch.ones(32)))
    with pytest.raises(VectorFileError, match="not a JSON object"):
        SteeringVector.load(write_vector_file(tmp_path / "list.safetensors", [meta]))

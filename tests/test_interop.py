"""Interop: steering-vectors, repeng and llama.cpp GGUF control vectors, on the tiny model.

Round trips must be bit-exact, the layer mapping must match where each library applies its
vectors (checked numerically against steering-vectors' ``apply`` and repeng's ``ControlModel``),
and GGUF files must be what llama.cpp reads (``direction.{n}``, 1-D F32, its metadata).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

import steerx_lens.hooks as hooks
from steerx_lens.backends import get_adapter
from steerx_lens.errors import ModelMismatchError, VectorShapeError
from steerx_lens.interop import (
    InteropError,
    as_steers,
    export_gguf,
    from_repeng,
    from_steering_vectors,
    import_gguf,
    to_repeng,
    to_steering_vectors,
)
from steerx_lens.models import load_tiny_model
from steerx_lens.vectors import SteeringVector, VectorFileError

TEXTS = ["Hello world. Steering vectors change what a language model writes.", "Cheers, Sam!"]
KINDS = {"decoder_block": "hook_resid_post", "self_attn": "hook_attn_out", "mlp": "hook_mlp_out"}


@pytest.fixture(scope="module")
def model() -> Any:
    return load_tiny_model("hf")


def sharpened(model: Any) -> Any:
    """``model`` with its block matrices scaled x15 (in place): the random blocks then change
    the residual stream enough that steering one block off shows clearly in the logits."""
    with torch.no_grad():
        for parameter in model.model.layers.parameters():
            if parameter.ndim == 2:
                parameter.mul_(15.0)
    return model


@pytest.fixture(scope="module")
def sharp() -> Any:
    return sharpened(load_tiny_model("hf"))


@pytest.fixture(scope="module")
def model3() -> Any:
    """The tiny model with 3 layers: llama.cpp can steer blocks 1 and 2 of it."""
    return load_tiny_model("hf", n_layers=3)


@pytest.fixture(scope="module")
def sv_lib() -> ModuleType:
    return pytest.importorskip("steering_vectors")


@pytest.fixture(scope="module")
def repeng() -> Iterator[ModuleType]:
    """repeng 0.4.0 (the latest on PyPI) names ``np.float_``, gone in NumPy 2: it is imported
    with that alias restored for the import only (the name is used in an annotation)."""
    pytest.importorskip("sklearn")
    with pytest.MonkeyPatch.context() as patch:
        if not hasattr(np, "float_"):
            patch.setattr(np, "float_", np.float64, raising=False)
        module = pytest.importorskip("repeng")
    yield module


def ours(model: Any, layers: list[int], kind: str = "hook_resid_post", seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    fingerprint = get_adapter(model).fingerprint()
    return [
        SteeringVector(
            vector=torch.randn(64, generator=generator),
            site=f"blocks.{layer}.{kind}",
            model_fingerprint=fingerprint,
            alpha=1.5,
            user_id="sam",
            description="likes hoppy beers",
        )
        for layer in layers
    ]


def token_ids(model: Any, text: str) -> torch.Tensor:
    return get_adapter(model).tokenizer(text, return_tensors="pt").input_ids


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


# ---------------------------------------------------------------------- steering-vectors
@pytest.mark.parametrize("layer_type", sorted(KINDS))
def test_from_steering_vectors_maps_each_layer_to_its_site_bit_exact(
    model: Any, sv_lib: ModuleType, layer_type: str
) -> None:
    a, b = torch.randn(64), torch.randn(64)
    sv = sv_lib.SteeringVector({1: b, 0: a}, layer_type)
    vectors = from_steering_vectors(sv, model, alpha=2.0)
    assert [v.site for v in vectors] == [
        f"blocks.0.{KINDS[layer_type]}",
        f"blocks.1.{KINDS[layer_type]}",
    ]
    assert torch.equal(vectors[0].vector, a) and torch.equal(vectors[1].vector, b)
    assert vectors[0].vector.data_ptr() != a.data_ptr()  # a copy, not a view
    assert {v.model_fingerprint for v in vectors} == {get_adapter(model).fingerprint()}
    assert all(v.alpha == 2.0 and v.extra["positions"] == "all" for v in vectors)
    back = to_steering_vectors(vectors)
    assert back.layer_type == layer_type and sorted(back.layer_activations) == [0, 1]
    assert torch.equal(back.layer_activations[0], a) and torch.equal(back.layer_activations[1], b)


def test_negative_steering_vectors_layers_count_from_the_last_block(
    model: Any, sv_lib: ModuleType
) -> None:
    (vector,) = from_steering_vectors(sv_lib.SteeringVector({-1: torch.randn(64)}), model)
    assert vector.site == "blocks.1.hook_resid_post" and vector.extra["layer"] == -1


@pytest.mark.parametrize("kind", sorted(KINDS.values()))
def test_ours_to_steering_vectors_and_back_is_bit_exact(
    model: Any, sv_lib: ModuleType, kind: str
) -> None:
    vectors = ours(model, [0, 1], kind)
    back = from_steering_vectors(to_steering_vectors(vectors), model)
    assert [v.site for v in back] == [v.site for v in vectors]
    assert all(torch.equal(x.vector, y.vector) for x, y in zip(back, vectors, strict=True))


@pytest.mark.parametrize("layer_type", sorted(KINDS))
def test_steering_vectors_apply_and_steerx_lens_give_the_same_logits(
    sharp: Any, sv_lib: ModuleType, layer_type: str
) -> None:
    generator = torch.Generator().manual_seed(1)
    layers = {0: torch.randn(64, generator=generator), 1: torch.randn(64, generator=generator)}
    sv = sv_lib.SteeringVector(layers, layer_type)
    vectors = from_steering_vectors(sv, sharp)
    for text in TEXTS:
        ids = token_ids(sharp, text)
        with torch.no_grad():
            plain = sharp(input_ids=ids).logits
            with sv.apply(sharp, multiplier=2.5):
                theirs = sharp(input_ids=ids).logits
        mine = hooks.run(sharp, ids, *as_steers(vectors, alpha=2.5))
        assert max_diff(theirs, plain) > 0.1  # the vectors do steer
        assert max_diff(mine, theirs) <= 1e-5, (layer_type, max_diff(mine, theirs))
        # one block later is clearly different: the test would see an off-by-one mapping
        later = {i + 1: v for i, v in layers.items() if i + 1 < 2}
        with torch.no_grad(), sv_lib.SteeringVector(later, layer_type).apply(sharp, multiplier=2.5):
            shifted = sharp(input_ids=ids).logits
        assert max_diff(shifted, theirs) > 0.05
    # our default positions (prompt_last_and_generated) would not steer the earlier tokens
    positions = "prompt_last_and_generated"  # steerx_lens's own default for its vectors
    only_last = hooks.run(sharp, ids, *(v.to_steer(2.5, positions) for v in vectors))
    assert max_diff(only_last[:, :-1], theirs[:, :-1]) > 0.1
    by_default = hooks.run(sharp, ids, *(v.to_steer(alpha=2.5) for v in vectors))
    assert max_diff(by_default, theirs) <= 1e-5  # imported vectors steer every position


def test_steering_vectors_conversion_errors_are_one_line(model: Any, sv_lib: ModuleType) -> None:
    with pytest.raises(InteropError) as error:
        from_steering_vectors(sv_lib.SteeringVector({2: torch.randn(64)}), model)
    assert "2 layers" in one_line(error)
    with pytest.raises(VectorShapeError) as error:
        from_steering_vectors(sv_lib.SteeringVector({0: torch.randn(32)}), model)
    assert "d_model is 64" in one_line(error)
    with pytest.raises(InteropError) as error:
        from_steering_vectors(sv_lib.SteeringVector({0: torch.randn(64)}, "input_layernorm"), model)
    assert "input_layernorm" in one_line(error)
    resid_post, attn_out = ours(model, [0]), ours(model, [1], "hook_attn_out")
    with pytest.raises(InteropError) as error:
        to_steering_vectors(resid_post + attn_out)
    assert "one site kind" in one_line(error)
    with pytest.raises(InteropError) as error:
        to_steering_vectors(resid_post + ours(model, [0], seed=1))
    assert "one direction per layer" in one_line(error)
    with pytest.raises(InteropError) as error:
        to_steering_vectors(ours(model, [1], "hook_resid_pre"))
    assert "hook_resid_pre" in one_line(error)
    with pytest.raises(InteropError) as error:
        to_steering_vectors([])
    one_line(error)


def test_vectors_of_two_models_are_not_merged(model: Any, model3: Any, sv_lib: ModuleType) -> None:
    with pytest.raises(ModelMismatchError) as error:
        to_steering_vectors(ours(model, [0]) + ours(model3, [1]))
    one_line(error)


def test_missing_optional_package_names_the_extra(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "steering_vectors", None)
    with pytest.raises(ModuleNotFoundError) as error:
        to_steering_vectors(ours(model, [0]))
    assert "pip install --no-deps steering-vectors" in one_line(error)


# ---------------------------------------------------------------------- repeng
def test_from_repeng_maps_keys_to_block_outputs_bit_exact(model: Any, repeng: ModuleType) -> None:
    directions = {
        1: np.random.randn(64).astype(np.float32),
        0: np.random.randn(64).astype(np.float32),
    }
    vectors = from_repeng(repeng.ControlVector("llama", directions), model)
    assert [v.site for v in vectors] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert all(v.vector.dtype == torch.float32 for v in vectors)
    assert np.array_equal(vectors[0].vector.numpy(), directions[0])
    assert np.array_equal(vectors[1].vector.numpy(), directions[1])
    (last,) = from_repeng(repeng.ControlVector("llama", {-1: directions[1]}), model)
    assert last.site == "blocks.1.hook_resid_post"
    back = to_repeng(vectors, model_type="llama")
    assert back.model_type == "llama" and sorted(back.directions) == [0, 1]
    assert all(np.array_equal(back.directions[k], directions[k]) for k in (0, 1))


def test_ours_to_repeng_and_back_is_bit_exact(model: Any, repeng: ModuleType) -> None:
    vectors = ours(model, [0, 1])
    back = from_repeng(to_repeng(vectors, model_type="llama"), model)
    assert [v.site for v in back] == [v.site for v in vectors]
    assert all(torch.equal(x.vector, y.vector) for x, y in zip(back, vectors, strict=True))
    with pytest.raises(InteropError) as error:
        to_repeng(ours(model, [0], "hook_mlp_out"), model_type="llama")
    assert "hook_resid_post" in one_line(error)


def test_repeng_control_model_and_steerx_lens_give_the_same_logits(
    sharp: Any, repeng: ModuleType
) -> None:
    generator = torch.Generator().manual_seed(2)
    control = repeng.ControlVector(
        "llama", {i: torch.randn(64, generator=generator).numpy() for i in (0, 1)}
    )
    vectors = from_repeng(control, sharp)
    wrapped = repeng.ControlModel(sharpened(load_tiny_model("hf")), [0, 1])  # it mutates its model
    try:
        for coeff in (-3.0, 2.0):
            wrapped.set_control(control, coeff=coeff)
            for text in TEXTS:
                ids = token_ids(sharp, text)
                with torch.no_grad():
                    theirs = wrapped(input_ids=ids).logits
                    plain = sharp(input_ids=ids).logits
                mine = hooks.run(sharp, ids, *as_steers(vectors, alpha=coeff))
                assert max_diff(theirs, plain) > 0.1
                assert max_diff(mine, theirs) <= 1e-5, max_diff(mine, theirs)
    finally:
        wrapped.unwrap()


# ---------------------------------------------------------------------- GGUF
def test_gguf_file_has_llama_cpp_layout(model3: Any, tmp_path: Path) -> None:
    import gguf

    path = export_gguf(ours(model3, [2, 1]), tmp_path / "v.gguf", model_hint="llama")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]
    for tensor in tensors.values():
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [64] and tensor.data.dtype == np.float32
    fields = reader.fields
    assert fields["general.architecture"].contents() == "controlvector"
    assert fields["controlvector.model_hint"].contents() == "llama"
    assert fields["controlvector.layer_count"].contents() == 2
    assert fields["controlvector.layer_count"].types == [gguf.GGUFValueType.INT32]
    assert "steerx.vectors" in fields
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left over


def test_gguf_export_import_round_trip_is_exact(model3: Any, tmp_path: Path) -> None:
    vectors = ours(model3, [1, 2])
    back = import_gguf(export_gguf(vectors, tmp_path / "v.gguf", model_hint="llama"), model3)
    assert len(back) == 2
    for mine, read in zip(vectors, back, strict=True):
        assert torch.equal(mine.vector, read.vector) and read.vector.dtype == torch.float32
        assert read.metadata() == mine.metadata()  # site, alpha, user, provenance, created...


def test_foreign_gguf_files_import_and_ours_read_in_repeng(
    model3: Any, repeng: ModuleType, tmp_path: Path
) -> None:
    directions = {
        1: np.random.randn(64).astype(np.float32),
        2: np.random.randn(64).astype(np.float32),
    }
    repeng.ControlVector("llama", directions).export_gguf(tmp_path / "repeng.gguf")
    vectors = import_gguf(tmp_path / "repeng.gguf", model3, alpha=0.5)
    assert [v.site for v in vectors] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert all(v.backbone == "gguf" and v.alpha == 0.5 for v in vectors)
    assert all(np.array_equal(v.vector.numpy(), directions[k + 1]) for k, v in enumerate(vectors))
    export_gguf(vectors, tmp_path / "ours.gguf", model_hint="llama")
    read = repeng.ControlVector.import_gguf(tmp_path / "ours.gguf")
    assert read.model_type == "llama" and sorted(read.directions) == [1, 2]
    assert all(np.array_equal(read.directions[k], directions[k]) for k in (1, 2))


def write_control_vector(
    path: Path, tensors: dict[str, np.ndarray], arch: str = "controlvector", steerx: str = ""
) -> Path:
    """A GGUF file as llama.cpp's cvector-generator writes it (``steerx``: our metadata)."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    writer.add_int32(f"{arch}.layer_count", len(tensors))
    if steerx:
        writer.add_string("steerx.vectors", steerx)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_that_does_not_fit_the_model_is_refused(
    model: Any, model3: Any, tmp_path: Path
) -> None:
    with pytest.raises(InteropError) as error:
        export_gguf(ours(model, [0]), tmp_path / "v.gguf", model_hint="llama")
    assert "block 0" in one_line(error)
    with pytest.raises(InteropError) as error:
        export_gguf(ours(model, [1], "hook_attn_out"), tmp_path / "v.gguf", model_hint="llama")
    assert "hook_resid_post" in one_line(error)
    vec = np.ones(64, dtype=np.float32)
    cases = {
        "narrow": ({"direction.1": np.ones(32, dtype=np.float32)}, "d_model is 64"),
        "deep": ({"direction.2": vec}, "2 layers"),
        "zero": ({"direction.0": vec}, "direction.{n} with n >= 1"),
        "named": ({"token_embd.weight": vec}, "direction.{n} with n >= 1"),
        "f16": ({"direction.1": vec.astype(np.float16)}, "F32"),
    }
    for name, (tensors, expected) in cases.items():
        path = write_control_vector(tmp_path / f"{name}.gguf", tensors)
        with pytest.raises(VectorFileError) as error:
            import_gguf(path, model)
        assert expected in one_line(error), name
    model_file = write_control_vector(tmp_path / "model.gguf", {"direction.1": vec}, arch="llama")
    with pytest.raises(VectorFileError) as error:
        import_gguf(model_file, model)
    assert "not a control vector" in one_line(error)
    exported = export_gguf(ours(model3, [1]), tmp_path / "other.gguf", model_hint="llama")
    with pytest.raises(ModelMismatchError) as error:
        import_gguf(exported, model)  # fits in shape, but made on another model
    one_line(error)


def test_corrupt_gguf_gives_a_one_line_error(model3: Any, tmp_path: Path) -> None:
    data = export_gguf(ours(model3, [1]), tmp_path / "v.gguf", model_hint="llama").read_bytes()
    garbled = bytearray(data)
    garbled[30:60] = b"\xff" * 30
    for name, content in {
        "truncated": data[: len(data) - 10],
        "header-only": data[:40],
        "empty": b"",
        "text": b"not a GGUF file at all " * 4,
        "garbled": bytes(garbled),
    }.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(VectorFileError) as error:
            import_gguf(path, model3)
        one_line(error)
    with pytest.raises(VectorFileError) as error:
        import_gguf(tmp_path / "missing.gguf", model3)
    one_line(error)
    for steerx in (
        "{not json",
        '["a list"]',
        '{"direction.1": {"site": "blocks.1.hook_resid_post"}}',
    ):
        path = write_control_vector(
            tmp_path / "meta.gguf", {"direction.1": np.ones(64, np.float32)}, steerx=steerx
        )
        with pytest.raises(VectorFileError) as error:
            import_gguf(path, model3)
        one_line(error)


def test_as_steers_steers_every_position_with_the_given_strength(model: Any) -> None:
    vectors = ours(model, [0, 1])
    steers = as_steers(vectors)
    assert [(s.site, s.positions, s.alpha) for s in steers] == [
        ("blocks.0.hook_resid_post", "all", 1.5),
        ("blocks.1.hook_resid_post", "all", 1.5),
    ]
    assert {s.alpha for s in as_steers(vectors, alpha=-2.0)} == {-2.0}

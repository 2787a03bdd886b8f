"""Multi-site vectors (SteeringVectorSet): applied together, one file, every entry point, interop.

Applying a set must equal applying each vector as its own ``hooks.Steer``; files round-trip bit
for bit and refuse corrupt or mismatched contents with one-line errors; hooks are gone after the
``with`` block, also when it raises.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import steerx_lens.hooks as hooks
from steerx_lens.backends import get_adapter
from steerx_lens.errors import ModelMismatchError, SteerXError
from steerx_lens.interop import (
    as_steers,
    export_gguf,
    from_repeng,
    from_steering_vectors,
    import_gguf,
    to_steering_vectors,
)
from steerx_lens.models import load_tiny_model
from steerx_lens.vectors import (
    SET_METADATA_KEY,
    SteeringVector,
    SteeringVectorSet,
    VectorFileError,
    VectorSetError,
    as_vector_set,
)

TEXTS = ["Hello world. Steering vectors change what a model writes.", "Cheers, Sam!"]
SITES = ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out"]


@pytest.fixture(scope="module")
def model() -> Any:
    torch.set_num_threads(1)
    return load_tiny_model("hf", n_layers=3)


@pytest.fixture(scope="module")
def other() -> Any:
    return load_tiny_model("hf", n_layers=2)


def make_set(
    model: Any, sites: list[str] = SITES, seed: int = 0, **fields: Any
) -> SteeringVectorSet:
    generator = torch.Generator().manual_seed(seed)
    fingerprint = get_adapter(model).fingerprint()
    return SteeringVectorSet(
        [
            SteeringVector(
                vector=torch.randn(64, generator=generator),
                site=site,
                model_fingerprint=fingerprint,
                alpha=1.0 + index,
                user_id="sam",
                **fields,
            )
            for index, site in enumerate(sites)
        ]
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


def separate_steers(vectors: SteeringVectorSet, alpha: float | None, positions: Any) -> list:
    """The set's vectors as hand-built Steers, one per site."""
    return [
        hooks.Steer(
            v.site,
            v.vector,
            alpha=v.alpha if alpha is None else alpha,
            positions=v.default_positions if positions is None else positions,
        )
        for v in vectors
    ]


# ------------------------------------------------------------------------------ the set itself


def test_set_is_an_ordered_sequence_indexed_by_position_and_site(model: Any) -> None:
    vectors = make_set(model)
    assert vectors.sites == (
        "blocks.0.hook_resid_post",
        "blocks.1.hook_attn_out",
        "blocks.2.hook_resid_post",
    )
    assert len(vectors) == 3 and list(vectors)[0] is vectors[0]
    assert vectors["blocks.1.hook_attn_out"].site == "blocks.1.hook_attn_out"
    assert vectors.model_fingerprint == get_adapter(model).fingerprint()
    with pytest.raises(KeyError, match="blocks.1.hook_mlp_out"):
        vectors["blocks.1.hook_mlp_out"]
    assert as_vector_set(vectors) is vectors
    assert as_vector_set(vectors[0]).sites == (vectors[0].site,)
    assert as_vector_set(list(vectors)).sites == vectors.sites


def test_set_refuses_duplicates_other_models_and_nothing(model: Any, other: Any) -> None:
    vectors = make_set(model)
    with pytest.raises(VectorSetError, match="blocks.0.hook_resid_post") as error:
        SteeringVectorSet([vectors[0], vectors[0] * 2.0])
    one_line(error)
    foreign = make_set(other, ["blocks.1.hook_resid_post"])[0]
    with pytest.raises(ModelMismatchError):
        SteeringVectorSet([vectors[0], foreign])
    with pytest.raises(VectorSetError):
        SteeringVectorSet([])
    with pytest.raises(VectorSetError):
        SteeringVectorSet([vectors[0], torch.zeros(64)])  # type: ignore[list-item]


# ------------------------------------------------------------------------------ applying


@pytest.mark.parametrize(("alpha", "positions"), [(None, None), (2.5, "all")])
def test_apply_equals_one_steer_per_site(model: Any, alpha: float | None, positions: Any) -> None:
    vectors = make_set(model)
    plain = hooks.run(model, TEXTS)
    expected = hooks.run(model, TEXTS, *separate_steers(vectors, alpha, positions))
    with vectors.apply(model, alpha=alpha, positions=positions):
        inside = hooks.run(model, TEXTS)
    assert max_diff(inside, expected) < 1e-5
    # every entry point takes the set as one argument (core.as_interventions)
    assert max_diff(hooks.run(model, TEXTS, vectors.to_steers(alpha, positions)[0]), plain) > 1e-3
    if alpha is None and positions is None:
        assert max_diff(hooks.run(model, TEXTS, vectors), expected) < 1e-5
    # all three sites are applied: dropping any one changes the logits
    assert max_diff(expected, plain) > 1e-2
    for index in range(3):
        rest = SteeringVectorSet([v for i, v in enumerate(vectors) if i != index])
        partial = hooks.run(model, TEXTS, *separate_steers(rest, alpha, positions))
        assert max_diff(partial, expected) > 1e-4


def test_hooks_entry_points_accept_a_set_among_other_interventions(model: Any) -> None:
    vectors = make_set(model)
    extra = hooks.Steer("blocks.1.hook_mlp_out", torch.ones(64), alpha=0.3)
    expected = hooks.run(model, TEXTS, *separate_steers(vectors, None, None), extra)
    assert max_diff(hooks.run(model, TEXTS, vectors, extra), expected) < 1e-5
    assert max_diff(hooks.run(model, TEXTS, extra, vectors), expected) < 1e-5
    with hooks.apply(model, vectors, extra):
        assert max_diff(hooks.run(model, TEXTS), expected) < 1e-5
    every = separate_steers(vectors, 2.0, "all")
    assert (
        max_diff(
            hooks.run(model, TEXTS, *as_steers(vectors, alpha=2.0)), hooks.run(model, TEXTS, *every)
        )
        < 1e-5
    )
    generated = hooks.generate(model, TEXTS, vectors, max_new_tokens=4).texts
    assert (
        generated
        == hooks.generate(
            model, TEXTS, *separate_steers(vectors, None, None), max_new_tokens=4
        ).texts
    )


def test_hooks_removed_on_exit_and_on_error(model: Any) -> None:
    vectors = make_set(model)
    plain = hooks.run(model, TEXTS)
    with vectors.apply(model, alpha=3.0):
        assert max_diff(hooks.run(model, TEXTS), plain) > 1e-2
    assert torch.equal(hooks.run(model, TEXTS), plain)
    with pytest.raises(RuntimeError, match="boom"), vectors.apply(model, alpha=3.0):
        assert max_diff(hooks.run(model, TEXTS), plain) > 1e-2
        raise RuntimeError("boom")
    assert torch.equal(hooks.run(model, TEXTS), plain)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_generate_equals_generating_with_the_steers(model: Any) -> None:
    vectors = make_set(model)
    steers = separate_steers(vectors, 4.0, None)
    expected = hooks.generate(model, TEXTS, *steers, max_new_tokens=6).texts
    assert vectors.generate(model, TEXTS, alpha=4.0, max_new_tokens=6) == expected
    assert expected != hooks.generate(model, TEXTS, max_new_tokens=6).texts


def test_applying_on_another_model_is_refused(model: Any, other: Any) -> None:
    vectors = make_set(model, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    with pytest.raises(ModelMismatchError), vectors.apply(other):
        pass


# ------------------------------------------------------------------------------ files


def test_save_load_is_bit_exact_and_deterministic(model: Any, tmp_path: Path) -> None:
    vectors = make_set(model, description="hops")
    half = SteeringVector(
        vector=torch.randn(64).to(torch.bfloat16),
        site="blocks.1.hook_resid_pre",
        model_fingerprint=vectors.model_fingerprint,
        residual_norm=12.5,
    )
    vectors = SteeringVectorSet([*vectors, half])
    path = vectors.save(tmp_path / "set.safetensors")
    assert sorted(load_file(path)) == sorted(vectors.sites)  # one tensor per site
    back = SteeringVectorSet.load(path, model)
    assert back.sites == vectors.sites
    for mine, theirs in zip(vectors, back, strict=True):
        assert mine.vector.dtype == theirs.vector.dtype
        assert torch.equal(mine.vector, theirs.vector)
        assert mine.metadata() == theirs.metadata()
    assert back.save(tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left over


def test_single_vector_files_and_set_files_are_told_apart(model: Any, tmp_path: Path) -> None:
    vectors = make_set(model)
    single = vectors[1].save(tmp_path / "one.safetensors")
    (loaded,) = SteeringVectorSet.load(single)
    assert torch.equal(loaded.vector, vectors[1].vector)
    path = vectors.save(tmp_path / "set.safetensors")
    with pytest.raises(VectorFileError, match="SteeringVectorSet.load") as error:
        SteeringVector.load(path)
    one_line(error)


def test_load_checks_the_model(model: Any, other: Any, tmp_path: Path) -> None:
    path = make_set(model).save(tmp_path / "set.safetensors")
    with pytest.raises(ModelMismatchError):
        SteeringVectorSet.load(path, other)


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], meta: Any) -> Path:
    save_file(tensors, str(path), metadata={SET_METADATA_KEY: json.dumps(meta)})
    return path


def test_corrupt_and_mismatched_files_give_one_line_errors(
    model: Any, other: Any, tmp_path: Path
) -> None:
    vectors = make_set(model)
    good = vectors.save(tmp_path / "good.safetensors")
    tensors, meta = load_file(good), vectors.metadata()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    missing_tensor = {k: v for k, v in tensors.items() if k != "blocks.1.hook_attn_out"}
    wrong_width = {**tensors, "blocks.0.hook_resid_post": torch.zeros(32)}
    swapped = json.loads(json.dumps(meta))
    swapped["vectors"]["blocks.0.hook_resid_post"]["site"] = "blocks.2.hook_resid_post"
    newer = {**meta, "format_version": 99}
    foreign_meta = json.loads(json.dumps(meta))
    foreign = make_set(other, ["blocks.1.hook_resid_post"])[0]
    foreign_meta["vectors"]["blocks.1.hook_attn_out"]["model_fingerprint"] = (
        foreign.model_fingerprint
    )
    cases = {
        "missing": tmp_path / "nope.safetensors",
        "truncated": truncated,
        "garbage": garbage,
        "tensor missing": _rewrite(tmp_path / "a.safetensors", missing_tensor, meta),
        "wrong width": _rewrite(tmp_path / "b.safetensors", wrong_width, meta),
        "site swapped": _rewrite(tmp_path / "c.safetensors", tensors, swapped),
        "newer format": _rewrite(tmp_path / "d.safetensors", tensors, newer),
        "not an object": _rewrite(tmp_path / "e.safetensors", tensors, [1, 2]),
        "two models": _rewrite(tmp_path / "f.safetensors", tensors, foreign_meta),
    }
    for name, path in cases.items():
        with pytest.raises(VectorFileError) as error:
            SteeringVectorSet.load(path)
        assert isinstance(error.value, SteerXError), name
        one_line(error)
    bad_json = tmp_path / "g.safetensors"
    save_file(tensors, str(bad_json), metadata={SET_METADATA_KEY: "{not json"})
    with pytest.raises(VectorFileError, match="corrupt metadata") as error:
        SteeringVectorSet.load(bad_json)
    one_line(error)


# ------------------------------------------------------------------------------ interop


def test_steering_vectors_round_trip_and_numbers(model: Any) -> None:
    sv_lib = pytest.importorskip("steering_vectors")
    vectors = make_set(model, ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"])
    theirs = to_steering_vectors(vectors)  # a set goes where a list of vectors goes
    assert sorted(theirs.layer_activations) == [0, 2]
    back = SteeringVectorSet(from_steering_vectors(theirs, model, alpha=2.5))
    assert back.sites == vectors.sites
    for mine, again in zip(vectors, back, strict=True):
        assert torch.equal(mine.vector, again.vector)
    ids = get_adapter(model).tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad(), theirs.apply(model, multiplier=2.5):
        expected = model(ids).logits
    with back.apply(model):  # imported vectors steer every position, at their alpha
        got = hooks.run(model, ids)
    assert max_diff(got, expected) < 1e-5
    assert isinstance(sv_lib.SteeringVector, type)


def test_repeng_directions_become_a_set(model: Any) -> None:
    generator = torch.Generator().manual_seed(3)
    directions = {1: torch.randn(64, generator=generator).numpy(), -1: torch.randn(64).numpy()}
    control = SimpleNamespace(model_type="llama", directions=directions)
    vectors = SteeringVectorSet(from_repeng(control, model, alpha=0.5))
    assert vectors.sites == ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    assert torch.equal(vectors[0].vector, torch.from_numpy(directions[1]))
    assert torch.equal(vectors[1].vector, torch.from_numpy(directions[-1]))


def test_gguf_round_trip_of_a_set_is_bit_exact(model: Any, tmp_path: Path) -> None:
    vectors = make_set(
        model, ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"], residual_norm=7.0
    )
    path = export_gguf(vectors, tmp_path / "set.gguf", model_hint="llama")
    back = SteeringVectorSet(import_gguf(path, model))
    assert back.sites == vectors.sites
    for mine, again in zip(vectors, back, strict=True):
        assert torch.equal(mine.vector, again.vector)
        assert mine.metadata() == again.metadata()
    assert (
        back.save(tmp_path / "a.safetensors").read_bytes()
        == vectors.save(tmp_path / "b.safetensors").read_bytes()
    )

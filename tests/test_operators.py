"""Directional ablation, project-then-add, negative layer indices, SteeringVectors as
interventions: on activations directly and through every backend (tiny model)."""

from __future__ import annotations

import pytest
import torch

import steerx_lens.hooks as hooks
from steerx_lens.backends import available_backends, get_adapter
from steerx_lens.core import parse_site
from steerx_lens.errors import InterventionTypeError, UnknownSiteError, VectorShapeError
from steerx_lens.models import load_tiny_model
from steerx_lens.vectors import SteeringVector

BACKENDS = available_backends()

CTX = hooks.HookContext.unpadded(2, 3)


def test_directional_ablation_removes_exactly_the_component() -> None:
    torch.manual_seed(0)
    act, direction = torch.randn(2, 3, 8), torch.randn(8)
    out = hooks.Ablate("blocks.0.hook_resid_post", mode="direction", direction=direction)(act, CTX)
    unit = direction / direction.norm()
    assert torch.allclose(out @ unit, torch.zeros(2, 3), atol=1e-6)
    # what is orthogonal to the direction is untouched
    assert torch.allclose(out, act - (act @ unit)[..., None] * unit, atol=1e-6)


def test_directional_ablation_per_row_and_on_chosen_positions_only() -> None:
    torch.manual_seed(1)
    act, rows = torch.randn(2, 3, 8), torch.randn(2, 8)
    ablate = hooks.Ablate("blocks.0.hook_resid_post", slice(-1, None), "direction", direction=rows)
    out = ablate(act, CTX)
    assert torch.equal(out[:, :2], act[:, :2])
    for row in range(2):
        unit = rows[row] / rows[row].norm()
        assert abs(float(out[row, 2] @ unit)) < 1e-5
        assert abs(float(act[row, 2] @ unit)) > 1e-3


def test_project_then_add_sets_the_projection_to_alpha_times_norm() -> None:
    torch.manual_seed(2)
    act, vector = torch.randn(2, 3, 8), torch.randn(8)
    steer = hooks.Steer("blocks.0.hook_resid_post", vector, alpha=2.0, operator="project")
    out = steer(act, CTX)
    unit = vector / vector.norm()
    assert torch.allclose(out @ unit, torch.full((2, 3), 2.0 * float(vector.norm())), atol=1e-5)
    added = hooks.Steer("blocks.0.hook_resid_post", vector, alpha=2.0)(act, CTX)
    assert torch.allclose(
        out - (out @ unit)[..., None] * unit, added - (added @ unit)[..., None] * unit, atol=1e-5
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: hooks.Steer("s", torch.zeros(4), operator="project"), "zero row"),
        (lambda: hooks.Steer("s", torch.ones(4), operator="rotate"), "operator"),
        (lambda: hooks.Ablate("s", mode="direction"), "direction="),
        (lambda: hooks.Ablate("s", mode="direction", direction=torch.zeros(4)), "zero row"),
        (lambda: hooks.Ablate("s", mode="sideways"), "Ablate.mode"),
    ],
)
def test_bad_operator_options_are_refused(make, match: str) -> None:
    with pytest.raises((ValueError, VectorShapeError), match=match):
        make()


def test_negative_layers_count_from_the_end() -> None:
    assert parse_site("blocks.-1.hook_resid_post", 30).name == "blocks.29.hook_resid_post"
    assert parse_site("blocks.-30.hook_resid_pre", 30).layer == 0
    with pytest.raises(UnknownSiteError, match="-31 is out of range"):
        parse_site("blocks.-31.hook_resid_pre", 30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_layer_steers_the_same_site_on_every_backend(backend: str) -> None:
    model = load_tiny_model(backend)
    vector = torch.linspace(-1, 1, 64)
    last = hooks.run(model, ["Hello world"], hooks.Steer("blocks.1.hook_resid_mid", vector))
    negative = hooks.run(model, ["Hello world"], hooks.Steer("blocks.-1.hook_resid_mid", vector))
    assert torch.allclose(negative, last, atol=1e-6)
    # one site, two names: both apply, in the order given
    twice = hooks.run(
        model,
        ["Hello world"],
        hooks.Steer("blocks.-1.hook_resid_mid", vector),
        hooks.Steer("blocks.1.hook_resid_mid", vector),
    )
    doubled = hooks.run(model, ["Hello world"], hooks.Steer("blocks.1.hook_resid_mid", 2 * vector))
    assert torch.allclose(twice, doubled, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_directional_ablation_and_project_agree_across_backends(backend: str) -> None:
    direction = torch.linspace(1, -1, 64)
    edits = [
        hooks.Ablate("blocks.0.hook_resid_post", mode="direction", direction=direction),
        hooks.Steer("blocks.1.hook_resid_pre", direction, alpha=0.5, operator="project"),
    ]
    expected = hooks.run(load_tiny_model("hf"), ["Hello world", "Hi"], *edits)
    got = hooks.run(load_tiny_model(backend), ["Hello world", "Hi"], *edits)
    real = get_adapter(load_tiny_model("hf")).encode(["Hello world", "Hi"]).attention_mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-4)


def test_a_steering_vector_is_an_intervention_everywhere() -> None:
    model = load_tiny_model("hf")
    fingerprint = get_adapter(model).fingerprint()
    vector = SteeringVector(torch.ones(64), "blocks.1.hook_resid_post", fingerprint, alpha=3.0)
    as_steer = hooks.run(model, ["Hello world"], vector.to_steer())
    assert torch.equal(hooks.run(model, ["Hello world"], vector), as_steer)
    generated = hooks.generate(model, ["Hello"], vector, max_new_tokens=4).sequences
    assert torch.equal(
        generated, hooks.generate(model, ["Hello"], vector.to_steer(), max_new_tokens=4).sequences
    )
    with pytest.raises(InterventionTypeError, match="str is not an intervention"):
        hooks.run(model, ["Hello"], "blocks.1.hook_resid_post")  # type: ignore[arg-type]


def test_vector_apply_is_scoped_and_generate_matches_hooks() -> None:
    model = load_tiny_model("hf")
    fingerprint = get_adapter(model).fingerprint()
    vector = SteeringVector(torch.ones(64), "blocks.1.hook_resid_post", fingerprint, alpha=3.0)
    plain = hooks.run(model, ["Hello world"])
    with vector.apply(model, positions="all"):
        inside = hooks.run(model, ["Hello world"])
    assert torch.allclose(
        inside, hooks.run(model, ["Hello world"], vector.to_steer(positions="all"))
    )
    assert not torch.allclose(inside, plain)
    assert torch.equal(hooks.run(model, ["Hello world"]), plain)  # hooks removed on exit
    with pytest.raises(RuntimeError, match="boom"), vector.apply(model):
        raise RuntimeError("boom")
    assert torch.equal(hooks.run(model, ["Hello world"]), plain)  # and on error
    expected = hooks.generate(model, ["Hello"], vector, max_new_tokens=5).texts
    assert vector.generate(model, ["Hello"], max_new_tokens=5) == expected


def test_imported_vectors_steer_every_position_by_default() -> None:
    model = load_tiny_model("hf")
    fingerprint = get_adapter(model).fingerprint()
    ours = SteeringVector(torch.ones(64), "blocks.1.hook_resid_post", fingerprint)
    imported = SteeringVector(
        torch.ones(64), "blocks.1.hook_resid_post", fingerprint, extra={"positions": "all"}
    )
    assert ours.to_steer().positions == "prompt_last_and_generated"
    assert imported.to_steer().positions == "all"
    assert imported.to_steer(positions=slice(0, 1)).positions == slice(0, 1)

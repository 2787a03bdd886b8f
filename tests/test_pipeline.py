"""The SteerX pipeline: population, per-user vectors in both modes, failures, generation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from steerx_lens.backbones import BACKBONES, get_backbone, register_backbone
from steerx_lens.data import UserHistory, make_synthetic_users
from steerx_lens.errors import SteerXError
from steerx_lens.evidence import UserEvidence
from steerx_lens.models import load_tiny_model
from steerx_lens.pipeline import FitResult, Population, SteerX, SteerXConfig, stacked_steer
from steerx_lens.vectors import SteeringVector


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_tiny_model("hf")


@pytest.fixture(scope="module")
def users() -> list[UserHistory]:
    return make_synthetic_users(n_users=3, n_history=3, n_heldout=1, seed=0)


def quick(model: Any, **changes: Any) -> SteerX:
    config = SteerXConfig(layer=1, answer_tokens=6, max_context_tokens=256, bipo_steps=3, **changes)
    return SteerX(model, config, progress=False)


@pytest.fixture(scope="module")
def fitted(tiny: Any, users: list[UserHistory]) -> FitResult:
    return quick(tiny).fit_many(users)


def test_fit_many_reports_a_broken_user_and_fits_the_others(
    tiny: Any, users: list, fitted: FitResult
) -> None:
    broken = UserHistory("broken", [], [])
    result = quick(tiny).fit_many([*users, broken])
    assert result.failures == {"broken": "empty history"}
    assert sorted(result.users) == sorted(u.user_id for u in users)
    for user_fit in result.users.values():
        for vector, mode in ((user_fit.baseline, "baseline"), (user_fit.steerx, "steerx")):
            assert vector.mode == mode and vector.d_model == 64
            assert torch.isfinite(vector.vector).all() and vector.norm() > 0
            assert vector.site == "blocks.1.hook_resid_post"
    shared = torch.stack([f.baseline.vector for f in result.users.values()]).mean(0)
    assert torch.allclose(result.population.shared.vector, shared)
    assert torch.equal(result.population.shared.vector, fitted.population.shared.vector)


def test_vectors_are_bit_identical_with_a_fixed_seed(
    tiny: Any, users: list, fitted: FitResult
) -> None:
    first, second = fitted, quick(tiny).fit_many(users)
    for user_id, user_fit in first.users.items():
        assert torch.equal(user_fit.baseline.vector, second.users[user_id].baseline.vector)
        assert torch.equal(user_fit.steerx.vector, second.users[user_id].steerx.vector)


@pytest.mark.parametrize("backbone", ["bipo", "sae"])
def test_other_backbones_run_in_both_modes(
    tiny: Any, users: list, backbone: str, tmp_path: Path
) -> None:
    sae = None
    if backbone == "sae":
        from steerx_lens.backbones.sae_training import train_demo_sae

        tl = load_tiny_model("transformer_lens")
        corpus = [f"{i.input} {i.output}" for u in users for i in u.history] * 8
        sae = train_demo_sae(
            1,
            d_sae=128,
            n_tokens=4096,
            context_size=32,
            batch_tokens=128,
            model=tl,
            corpus=corpus,
            cache=tmp_path,
        )
    pipeline = quick(tiny, backbone=backbone)
    pipeline.sae = sae
    result = pipeline.fit_many(users)
    fitted = result.users[users[0].user_id]
    assert fitted.baseline.backbone == backbone and fitted.steerx.backbone == backbone
    assert torch.isfinite(fitted.baseline.vector).all() and fitted.baseline.norm() > 0


def test_fit_needs_a_population_and_population_round_trips(
    tiny: Any, users: list, tmp_path: Path
) -> None:
    pipeline = quick(tiny)
    with pytest.raises(SteerXError, match="reference population"):
        pipeline.fit(users[0])
    with pytest.raises(SteerXError, match="at least 2 users"):
        pipeline.build_population(users[:1])
    population = pipeline.build_population(users)
    population.descriptions = {u.user_id: f"writes like {u.user_id}" for u in users}
    population.failures = {"ghost": "no history"}
    population.save(tmp_path)
    loaded = Population.load(tmp_path, model=tiny)
    assert torch.equal(loaded.shared.vector, population.shared.vector)
    assert [u.user_id for u in loaded.users] == [u.user_id for u in users]
    assert loaded.residual_norm == population.residual_norm
    assert loaded.descriptions == population.descriptions
    assert loaded.failures == population.failures
    first = users[0].user_id  # the leave-one-out shared vector survives the round trip
    assert torch.equal(loaded.shared_for(first).vector, population.shared_for(first).vector)
    assert not torch.equal(loaded.shared_for(first).vector, loaded.shared.vector)
    fitted = pipeline.fit(users[0], loaded)
    assert fitted.steerx.mode == "steerx"
    with pytest.raises(SteerXError, match="no saved population"):
        Population.load(tmp_path / "nothing")
    (tmp_path / "population.json").write_text("{not json")
    with pytest.raises(SteerXError, match="corrupt"):
        Population.load(tmp_path)


def test_generate_steers_each_row_with_its_own_vector(
    tiny: Any, users: list, fitted: FitResult
) -> None:
    vectors = [fitted.users[u.user_id].baseline * 50.0 for u in users]
    pipeline = quick(tiny)
    prompts = ["What is good beer?"] * 3
    batched = pipeline.generate(prompts, vectors, max_new_tokens=5)
    singles = [pipeline.generate(prompts[:1], [v], max_new_tokens=5)[0] for v in vectors]
    assert batched == singles
    with pytest.raises(SteerXError, match="one per row"):
        pipeline.generate(prompts, vectors[:2])


def test_stacked_steer_refuses_mixed_sites(fitted: FitResult) -> None:
    vector = fitted.population.shared
    elsewhere = SteeringVector(vector.vector, "blocks.0.hook_resid_post", vector.model_fingerprint)
    with pytest.raises(SteerXError, match="share one site"):
        stacked_steer([vector, elsewhere])
    steer = stacked_steer([vector, vector * 2.0], alpha=3.0)
    assert torch.allclose(steer.vector[1], 6.0 * vector.vector)


def test_unknown_backbone_is_refused_with_the_registered_names(tiny: Any) -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'nope'; registered: .*mean_diff"):
        quick(tiny, backbone="nope")


def test_a_backbone_registered_from_outside_runs_through_steerx(
    tiny: Any, users: list, fitted: FitResult
) -> None:
    def flipped(model: Any, site: str, chosen: Any, rejected: Any, **options: Any) -> Any:
        """The mean difference with the sides swapped."""
        return -get_backbone("mean_diff")(model, site, chosen, rejected, **options)

    register_backbone("flipped", flipped)
    try:
        result = quick(tiny, backbone="flipped").fit_many(users)
    finally:
        del BACKBONES["flipped"]
    for user_id, user_fit in result.users.items():
        assert user_fit.baseline.backbone == "flipped"
        assert torch.allclose(user_fit.baseline.vector, -fitted.users[user_id].baseline.vector)
    assert torch.allclose(result.population.shared.vector, -fitted.population.shared.vector)


def test_evidence_is_reused_at_another_site_and_round_trips(
    tiny: Any, users: list, tmp_path: Path
) -> None:
    pipeline = quick(tiny, swap_threshold=0.0)  # the random model's effects are tiny
    at_1 = pipeline.fit_many(users)
    at_0 = pipeline.fit_many(users, site="blocks.0.hook_resid_post", evidence=at_1.evidence)
    assert pipeline.config.layer == 1
    fresh = SteerX(tiny, replace(pipeline.config, layer=0), progress=False).fit_many(users)
    assert sum(f.n_swapped_tokens for f in at_0.users.values()) > 0
    for user_id, user_fit in at_0.users.items():
        assert user_fit.steerx.site == "blocks.0.hook_resid_post"
        assert torch.equal(user_fit.baseline.vector, fresh.users[user_id].baseline.vector)
        assert torch.equal(user_fit.steerx.vector, fresh.users[user_id].steerx.vector)
        population = at_0.population
        anchor = pipeline.anchor(user_id, population, user_fit.baseline, user_fit.anchor_weight)
        again = user_fit.steerx_at(anchor, pipeline.config.r, population.residual_norm)
        assert torch.equal(again.vector, user_fit.steerx.vector)
    user_id = users[0].user_id
    path = at_1.evidence[user_id].save(tmp_path / "evidence.safetensors")
    loaded = UserEvidence.load(path)
    assert loaded.pairs == at_1.evidence[user_id].pairs
    assert loaded.negatives == at_1.evidence[user_id].negatives
    assert loaded.attribution.spans == at_1.evidence[user_id].attribution.spans
    reloaded = SteerX(tiny, pipeline.config, progress=False).vectors(loaded, at_0.population)
    assert torch.equal(reloaded.steerx.vector, at_0.users[user_id].steerx.vector)
    assert reloaded.description == at_0.users[user_id].description

"""SteerX's personal-direction constructions and evidence-scaled strength (issue 13)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from steerx_lens.backends import get_adapter
from steerx_lens.constructions import DESCRIPTION_DRIVEN, NEEDS_GRADIENTS
from steerx_lens.data import UserHistory, make_synthetic_users
from steerx_lens.describe import EMPTY_DESCRIPTION
from steerx_lens.errors import SteerXError
from steerx_lens.models import load_tiny_model
from steerx_lens.pipeline import FitResult, SteerX, SteerXConfig, default_construction

CONFIG = SteerXConfig(
    layer=1,
    answer_tokens=4,
    max_context_tokens=256,
    swap_threshold=0.0,
    construction="minimal_pairs",
    strength="fixed",
    anchor="shared",
)
CONTRASTS = (
    "description_contrast",
    "description_content",
    "history_contrast",
    "history_description",
    "description_at_effects",
    "history_at_effects",
    "description_blend",
    "description_specific",
    "description_contrast_specific",
)


def described(evidence: Any, user_id: str) -> Any:
    """``evidence`` with a description of its own (different per user)."""
    text = f"Signs off with 'Cheers' and writes about {user_id}."
    return replace(evidence, attribution=replace(evidence.attribution, description=text))


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_tiny_model("hf")


@pytest.fixture(scope="module")
def users() -> list[UserHistory]:
    return make_synthetic_users(n_users=3, n_history=6, n_heldout=1, seed=5)


@pytest.fixture(scope="module")
def prepared(tiny: Any, users: list[UserHistory]) -> tuple[Any, Any]:
    pipeline = SteerX(tiny, CONFIG, progress=False)
    population = pipeline.build_population(users)
    population.descriptions = {
        u.user_id: described(pipeline.evidence(u, population), u.user_id).description for u in users
    }
    return population, pipeline.evidence(users[0], population)


@pytest.mark.parametrize(
    ("construction", "backbone"),
    [("minimal_pairs", "mean_diff"), ("minimal_pairs", "bipo")]
    + [("description_pairs", "mean_diff"), ("description_pairs", "bipo")]
    + [(c, b) for c in NEEDS_GRADIENTS for b in ("mean_diff", "bipo")]
    + [(c, "mean_diff") for c in CONTRASTS],
)
def test_every_construction_gives_a_finite_direction_of_the_models_width(
    tiny: Any, users: list[UserHistory], construction: str, backbone: str
) -> None:
    config = replace(CONFIG, construction=construction, backbone=backbone, bipo_steps=3)
    pipeline = SteerX(tiny, config, progress=False)
    if construction in DESCRIPTION_DRIVEN:
        # the random tiny model finds no spans, so no description: give each user one
        population = pipeline.build_population(users)
        evidence = [described(pipeline.evidence(user, population), user.user_id) for user in users]
        population.descriptions = {e.user_id: e.description for e in evidence}
        fitted_users = [pipeline.vectors(e, population) for e in evidence]
    else:
        fitted_users = list(pipeline.fit_many(users).users.values())
    assert len(fitted_users) == len(users)
    for fitted in fitted_users:
        assert fitted.personal_direction is not None
        assert fitted.personal_direction.shape == (64,)
        assert torch.isfinite(fitted.steerx.vector).all()
        assert float(fitted.personal_direction.norm()) == pytest.approx(1.0, abs=1e-5)


def test_a_contrast_construction_refuses_a_response_scoring_backbone(tiny: Any) -> None:
    with pytest.raises(SteerXError, match="activation backbone"):
        SteerX(tiny, replace(CONFIG, construction="history_contrast", backbone="bipo"))
    with pytest.raises(SteerXError, match="unknown construction"):
        SteerX(tiny, replace(CONFIG, construction="nope"))


@pytest.mark.parametrize("construction", list(DESCRIPTION_DRIVEN))
def test_the_description_drives_the_vector(
    tiny: Any, prepared: tuple[Any, Any], construction: str
) -> None:
    population, evidence = prepared
    pipeline = SteerX(tiny, replace(CONFIG, construction=construction), progress=False)

    def direction(description: str) -> torch.Tensor:
        attribution = replace(evidence.attribution, description=description)
        changed = replace(evidence, attribution=attribution)
        fitted = pipeline.vectors(changed, population)
        assert fitted.personal_direction is not None
        return fitted.personal_direction

    first = direction("Signs off with 'Cheers' and loves the word jolly.")
    assert torch.isfinite(first).all() and first.shape == (64,)
    assert torch.equal(first, direction("Signs off with 'Cheers' and loves the word jolly."))
    other = direction("Writes formal, long sentences about gardening.")
    assert not torch.allclose(first, other, atol=1e-4)


def described_fit(pipeline: SteerX, users: list[UserHistory]) -> FitResult:
    """A fit whose users each have a description of their own (the tiny model finds none)."""
    population = pipeline.build_population(users)
    evidence = {u.user_id: described(pipeline.evidence(u, population), u.user_id) for u in users}
    population.descriptions = {uid: e.description for uid, e in evidence.items()}
    fitted = {uid: pipeline.vectors(e, population) for uid, e in evidence.items()}
    return FitResult(population, fitted, {}, evidence)


@pytest.mark.parametrize("construction", ["description_contrast", "minimal_pairs"])
def test_the_description_swap_control_uses_another_users_description(
    tiny: Any, users: list[UserHistory], construction: str
) -> None:
    config = replace(CONFIG, construction=construction, strength="reliability")
    pipeline = SteerX(tiny, config, progress=False)
    fit = described_fit(pipeline, users)
    assert any(fit.users[u.user_id].personal_direction is not None for u in users)
    for user in users:
        uid = user.user_id
        own = fit.users[uid].personal_direction
        partner = pipeline.description_partner(fit, uid)
        assert partner in fit.users and partner != uid
        assert partner == pipeline.description_partner(fit, uid)  # seeded, stable
        swapped = pipeline.description_swap_direction(fit, uid)
        if own is None:  # no reliable personal part: the control adds none either
            assert swapped is None
            continue
        assert swapped is not None
        assert float(swapped.norm()) == pytest.approx(float(own.norm()), rel=1e-5)
        if construction in DESCRIPTION_DRIVEN:
            assert not torch.allclose(swapped, own, atol=1e-4)
        else:  # minimal pairs never read the description: the control is SteerX itself
            assert torch.equal(swapped, own)
        norm = fit.population.residual_norm
        vector = pipeline.method_vector(fit, uid, "description_swap", alpha=1.0).vector
        anchor = pipeline.anchor(uid, fit.population, fit.users[uid].baseline)
        assert torch.allclose(vector, anchor.vector + config.r * norm * swapped, atol=1e-5)


def test_minimal_pairs_do_not_depend_on_the_description(
    tiny: Any, prepared: tuple[Any, Any]
) -> None:
    population, evidence = prepared
    pipeline = SteerX(tiny, CONFIG, progress=False)
    a = pipeline.vectors(evidence, population).personal_direction
    attribution = replace(evidence.attribution, description="something else entirely")
    b = pipeline.vectors(replace(evidence, attribution=attribution), population).personal_direction
    assert a is not None and b is not None and torch.equal(a, b)


def test_reliability_weights_the_personal_part_and_no_evidence_gives_the_shared_vector(
    tiny: Any, prepared: tuple[Any, Any]
) -> None:
    population, evidence = prepared
    config = replace(CONFIG, strength="reliability")
    pipeline = SteerX(tiny, config, progress=False)
    weight = pipeline.reliability(evidence, population, population.site)
    assert 0.0 <= weight <= 1.0
    fitted = pipeline.vectors(evidence, population)
    if weight > 0:
        assert fitted.personal_direction is not None
        assert float(fitted.personal_direction.norm()) == pytest.approx(weight, abs=1e-5)
        norm = population.residual_norm
        assert fitted.personal_norm(0.2, norm) == pytest.approx(0.2 * norm * weight, rel=1e-5)
    # no minimal pair at all: no evidence, the shared vector alone
    empty = replace(evidence, pairs=replace(evidence.pairs, originals=[], twins=[]))
    assert pipeline.reliability(empty, population, population.site) == 0.0
    alone = pipeline.vectors(empty, population)
    assert alone.personal_direction is None
    shared = population.shared_for(evidence.user_id).vector
    assert torch.equal(alone.steerx.vector, shared)


def test_reliability_rises_with_the_agreement_between_items(
    tiny: Any, prepared: tuple[Any, Any]
) -> None:
    population, evidence = prepared
    pipeline = SteerX(tiny, replace(CONFIG, strength="reliability"), progress=False)
    pairs = evidence.pairs
    assert len(pairs.originals) >= 2

    def weight(originals: list, twins: list) -> float:
        changed = replace(evidence, pairs=replace(pairs, originals=originals, twins=twins))
        return pipeline.reliability(changed, population, population.site)

    twice = [s for s in pairs.originals for _ in range(2)]
    twins_twice = [s for s in pairs.twins for _ in range(2)]
    agree = weight(twice, twins_twice)  # odd half = even half: full agreement
    # the odd half reversed (twin vs original): the halves point in opposite directions
    flipped_o = [
        o if i % 2 == 0 else t for i, (o, t) in enumerate(zip(twice, twins_twice, strict=False))
    ]
    flipped_t = [
        t if i % 2 == 0 else o for i, (o, t) in enumerate(zip(twice, twins_twice, strict=False))
    ]
    disagree = weight(flipped_o, flipped_t)
    actual = weight(pairs.originals, pairs.twins)
    assert agree == pytest.approx(1.0, abs=1e-5)
    assert disagree == 0.0
    assert disagree <= actual <= agree


def test_no_description_evidence_gives_no_description_component(
    tiny: Any, prepared: tuple[Any, Any]
) -> None:
    population, evidence = prepared
    empty = replace(
        evidence, attribution=replace(evidence.attribution, description=EMPTY_DESCRIPTION)
    )
    for construction in ("description_contrast", "description_pairs"):
        pipeline = SteerX(tiny, replace(CONFIG, construction=construction), progress=False)
        fitted = pipeline.vectors(empty, population)
        assert fitted.personal_direction is None
        assert torch.equal(fitted.steerx.vector, population.shared_for(evidence.user_id).vector)


@pytest.mark.parametrize("construction", ["minimal_pairs", "description_pairs"])
def test_the_sae_backbone_picks_features_by_attribution_in_steerx_mode(
    tiny: Any, prepared: tuple[Any, Any], construction: str
) -> None:
    """SAE projection as a step on a construction: at most ``sae_k`` features, chosen by the
    attribution scores of the construction's two sides (an exact identity SAE, so a feature is
    one coordinate's sign)."""
    population, evidence = prepared
    exact = StandardSAE(StandardSAEConfig(d_in=64, d_sae=128))
    exact.cfg.metadata.hook_name = population.site
    with torch.no_grad():
        eye = torch.eye(64)
        exact.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        exact.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    config = replace(
        CONFIG, construction=construction, backbone="sae", sae_k=4, sae_by="attribution"
    )
    pipeline = SteerX(tiny, config, sae=exact, progress=False)
    component = pipeline.personal_component(
        described(evidence, evidence.user_id), population, population.site
    )
    assert component is not None and torch.isfinite(component).all()
    assert 0 < int((component != 0).sum()) <= 4
    with pytest.raises(SteerXError, match="sae_by"):
        SteerX(tiny, replace(config, sae_by="size"))


def test_the_shrunk_anchor_follows_the_reliability_of_the_baseline_personal_part(
    tiny: Any, prepared: tuple[Any, Any]
) -> None:
    """anchor="shrunk": shared + w·(baseline − shared), w the split-half reliability of the
    user's baseline personal part: 1 when both halves agree exactly, 0 with one item (no
    second half: the shared vector), in between otherwise."""
    population, evidence = prepared
    pipeline = SteerX(tiny, replace(CONFIG, anchor="shrunk"), progress=False)
    site, uid = population.site, evidence.user_id
    shared = population.shared_for(uid).vector
    actual = pipeline.baseline_reliability(evidence, population, site)
    assert 0.0 <= actual <= 1.0
    fitted = pipeline.vectors(evidence, population)
    assert fitted.anchor_weight == pytest.approx(actual)
    anchor = pipeline.anchor(uid, population, fitted.baseline, fitted.anchor_weight).vector
    torch.testing.assert_close(anchor, shared + actual * (fitted.baseline.vector - shared))
    no_personal = fitted.steerx_at(
        pipeline.anchor(uid, population, fitted.baseline, fitted.anchor_weight), 0.0, 1.0
    )
    torch.testing.assert_close(no_personal.vector, anchor)

    def doubled(e: Any) -> Any:  # every item twice: the odd half equals the even half
        items = [i for i in e.user.history for _ in range(2)]
        negatives = [n for n in e.negatives for _ in range(2)]
        return replace(e, user=replace(e.user, history=items), negatives=negatives)

    assert pipeline.baseline_reliability(doubled(evidence), population, site) == pytest.approx(
        1.0, abs=1e-5
    )
    single = replace(
        evidence,
        user=replace(evidence.user, history=evidence.user.history[:1]),
        negatives=evidence.negatives[:1],
    )
    assert pipeline.baseline_reliability(single, population, site) == 0.0
    with pytest.raises(SteerXError, match="shrunk"):
        pipeline.anchor(uid, population, fitted.baseline)
    with pytest.raises(SteerXError, match="anchor must be"):
        SteerX(tiny, replace(CONFIG, anchor="own"))


def test_the_default_construction_is_one_for_every_backbone(tiny: Any) -> None:
    """A config without a construction gets the validated one for every backbone; a model
    without gradients (a remote run) gets an activation contrast, and a backbone that trains
    through gradients is refused there before anything runs."""
    assert default_construction() == "likelihood_description"
    assert default_construction(can_backpropagate=False) == "description_contrast"
    plain = SteerX(tiny, SteerXConfig(layer=1), progress=False).config
    assert (plain.construction, plain.anchor, plain.strength) == (
        "likelihood_description",
        "baseline",
        "reliability",
    )
    assert SteerX(tiny, SteerXConfig(layer=1, backbone="bipo")).config.construction == (
        "likelihood_description"
    )
    remote = load_tiny_model("nnsight")
    get_adapter(remote, remote="local")  # nnsight's own serialise -> remote path, no network
    assert SteerX(remote, SteerXConfig(layer=1)).config.construction == "description_contrast"
    with pytest.raises(SteerXError, match="'bipo' trains through the model's gradients"):
        SteerX(remote, SteerXConfig(layer=1, backbone="bipo"))


def test_split_halves_keep_each_items_token_effects_with_it(prepared: tuple[Any, Any]) -> None:
    from steerx_lens.pipeline import _halves

    _, evidence = prepared
    assert evidence.attribution.items
    seen = 0
    for half in _halves(evidence):
        for effects in half.attribution.items:
            item = half.user.history[effects.item_index]
            whole = evidence.attribution.items[
                [e.item_index for e in evidence.attribution.items].index(
                    evidence.user.history.index(item)
                )
            ]
            assert torch.equal(effects.token_ids, whole.token_ids)
            seen += 1
    assert seen == len(evidence.attribution.items)


def test_the_specific_direction_needs_and_uses_other_users_descriptions(
    tiny: Any, prepared: tuple[Any, Any]
) -> None:
    population, evidence = prepared
    pipeline = SteerX(tiny, replace(CONFIG, construction="description_specific"), progress=False)
    mine = described(evidence, evidence.user_id)
    with pytest.raises(SteerXError, match="other users' descriptions"):
        pipeline.personal_component(mine, replace(population, descriptions={}), population.site)
    component = pipeline.personal_component(mine, population, population.site)
    assert component is not None and torch.isfinite(component).all()
    same = {uid: mine.description for uid in population.descriptions}
    # every other user described alike: nothing specific to contrast with
    assert (
        pipeline.personal_component(mine, replace(population, descriptions=same), population.site)
        is None
    )


def test_the_random_control_of_an_effect_driven_construction_shuffles_the_effects(
    tiny: Any, prepared: tuple[Any, Any]
) -> None:
    population, evidence = prepared
    pipeline = SteerX(tiny, replace(CONFIG, construction="preference_gradient"), progress=False)
    chosen = pipeline.personal_component(evidence, population, pipeline.config.site)
    random_direction = pipeline.random_direction(evidence, population, pipeline.config.site)
    assert chosen is not None and random_direction is not None
    assert float(random_direction.norm()) == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(chosen / chosen.norm(), random_direction, atol=1e-3)
    again = pipeline.random_direction(evidence, population, pipeline.config.site)
    torch.testing.assert_close(random_direction, again)
    minimal = SteerX(tiny, CONFIG, progress=False)  # other constructions: random minimal pairs
    expected = minimal.personal_direction(minimal.random_swap_pairs(evidence), CONFIG.site)
    torch.testing.assert_close(
        minimal.random_direction(evidence, population, CONFIG.site), expected
    )

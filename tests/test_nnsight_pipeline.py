"""Every SteerX stage on the nnsight backend, local and through the remote path, equals HF.

Demo model (SmolLM2-135M-Instruct): token effects and vectors within 1e-4 of the HF backend's,
identical greedy generations for several users batched with per-row vectors, identical held-out
NLLs. The backbones that need more than activations (BiPO: gradients; SAE: an SAELens SAE) are
compared on the tiny model, where they are fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from steerx_lens.backends import get_adapter
from steerx_lens.data import UserHistory, make_synthetic_users
from steerx_lens.errors import SteerXError
from steerx_lens.evaluation.metrics import encode_for_eval, token_nll
from steerx_lens.models import load_tiny_model
from steerx_lens.pipeline import FitResult, SteerX, SteerXConfig

CONFIG = SteerXConfig(answer_tokens=8, max_context_tokens=384, construction="description_contrast")
"""An activation construction: it runs on every path (a remote run gives no gradients)."""
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def users() -> list[UserHistory]:
    return make_synthetic_users(n_users=3, n_history=2, n_heldout=1, seed=0)


@pytest.fixture(scope="module")
def reference(demo_models: dict[str, Any], users: list[UserHistory]) -> FitResult:
    return SteerX(demo_models["hf"], CONFIG, progress=False).fit_many(users)


@pytest.fixture(params=[False, "local"], ids=["local", "remote_simulated"])
def nnsight_model(request: pytest.FixtureRequest, demo_models: dict[str, Any]) -> Iterator[Any]:
    model = demo_models["nnsight"]
    get_adapter(model, remote=request.param)
    try:
        yield model
    finally:
        get_adapter(model, remote=False)


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


@pytest.mark.demo
def test_every_stage_matches_hf(
    nnsight_model: Any, demo_models: dict[str, Any], users: list, reference: FitResult
) -> None:
    pipeline = SteerX(nnsight_model, CONFIG, progress=False)
    fit = pipeline.fit_many(users)
    assert sorted(fit.users) == sorted(reference.users) and not fit.failures
    assert max_gap(fit.population.shared.vector, reference.population.shared.vector) <= TOLERANCE
    for user_id, expected in reference.users.items():
        got = fit.users[user_id]
        for mine, theirs in zip(got.attribution.items, expected.attribution.items, strict=True):
            assert max_gap(mine.effects, theirs.effects) <= TOLERANCE
            assert torch.equal(mine.counterfactual_top, theirs.counterfactual_top)
        assert [s.text for s in got.attribution.spans] == [
            s.text for s in expected.attribution.spans
        ]
        assert got.n_swapped_tokens == expected.n_swapped_tokens
        assert max_gap(got.baseline.vector, expected.baseline.vector) <= TOLERANCE
        assert max_gap(got.steerx.vector, expected.steerx.vector) <= TOLERANCE
        assert got.steerx.model_fingerprint == expected.steerx.model_fingerprint

    # several users in one generate call, one vector per row: the same greedy tokens as HF
    prompts = ["What do you think about the weekend?", "Any news today?", "How was dinner?"]
    vectors = [reference.users[u.user_id].steerx for u in users]
    hf_texts = SteerX(demo_models["hf"], CONFIG, progress=False).generate(
        prompts, vectors, max_new_tokens=12
    )
    assert pipeline.generate(prompts, vectors, max_new_tokens=12) == hf_texts

    # held-out NLL with per-row vectors (rows of different users in one batch)
    tokenizer = pipeline.adapter.tokenizer
    texts = [encode_for_eval(tokenizer, user.heldout[0]) for user in users]
    mine = token_nll(nnsight_model, texts, vectors)
    theirs = token_nll(demo_models["hf"], texts, vectors)
    for a, b in zip(mine, theirs, strict=True):
        assert max_gap(a, b) <= TOLERANCE


def random_sae(d_model: int, site: str) -> StandardSAE:
    """A seeded random SAELens SAE (the projection only needs a dictionary of directions)."""
    cfg = StandardSAEConfig(d_in=d_model, d_sae=4 * d_model)
    cfg.metadata.hook_name = site
    torch.manual_seed(0)
    return StandardSAE(cfg)


@pytest.mark.parametrize("backbone", ["sae", "bipo"])
def test_other_backbones_match_hf_on_nnsight(backbone: str) -> None:
    users = make_synthetic_users(n_users=3, n_history=3, n_heldout=1, seed=0)
    config = replace(
        CONFIG,
        layer=1,
        backbone=backbone,
        construction=None,  # each backbone's default
        bipo_steps=3,
        sae_k=8,
        max_context_tokens=256,
    )
    hf, nnsight_model = load_tiny_model("hf"), load_tiny_model("nnsight")
    sae = random_sae(64, config.site) if backbone == "sae" else None
    expected = SteerX(hf, config, sae=sae, progress=False).fit_many(users)
    got = SteerX(nnsight_model, config, sae=sae, progress=False).fit_many(users)
    for user_id, theirs in expected.users.items():
        mine = got.users[user_id]
        assert max_gap(mine.baseline.vector, theirs.baseline.vector) <= TOLERANCE
        assert max_gap(mine.steerx.vector, theirs.steerx.vector) <= TOLERANCE
        assert mine.steerx.vector.abs().sum() > 0


@pytest.mark.parametrize("remote", [False, "local"], ids=["local", "remote_simulated"])
def test_output_space_constructions_need_gradients(remote: Any) -> None:
    """Local nnsight gives the HF backend's gradient directions; a remote run, which cannot
    give gradients, gets the activation default and refuses an output-space construction."""
    users = make_synthetic_users(n_users=3, n_history=3, n_heldout=1, seed=1)
    config = SteerXConfig(layer=1, answer_tokens=4, max_context_tokens=256)
    model = load_tiny_model("nnsight")
    get_adapter(model, remote=remote)
    if remote:
        assert SteerX(model, config).config.construction == "description_contrast"
        with pytest.raises(SteerXError, match="needs the model's gradients"):
            SteerX(model, replace(config, construction="likelihood_gradient"))
        return
    chosen = replace(config, construction="likelihood_gradient")
    pipelines = [SteerX(m, chosen, progress=False) for m in (model, load_tiny_model("hf"))]
    directions = []
    for pipeline in pipelines:
        population = pipeline.build_population(users)
        evidence = pipeline.evidence(users[0], population)
        directions.append(pipeline.personal_component(evidence, population, chosen.site))
    assert directions[0] is not None and directions[1] is not None
    assert max_gap(directions[0], directions[1]) <= TOLERANCE * float(directions[1].abs().max())

"""Integration: the four backends on the demo model (SmolLM2-135M-Instruct) agree with HF."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from steerx_lens import hooks
from steerx_lens.backends import get_adapter

pytestmark = pytest.mark.demo

PROMPTS = ["The best way to brew a stout is", "Health tip of the day:"]
SITE = "blocks.10.hook_resid_post"


def demo_vector(model: Any) -> torch.Tensor:
    """A random direction scaled to ~0.5 of the typical residual norm at the site."""
    _, acts = hooks.cache(model, PROMPTS, [SITE])
    norm = acts[SITE].norm(dim=-1).median()
    direction = torch.randn(get_adapter(model).d_model, generator=torch.Generator().manual_seed(0))
    return direction / direction.norm() * norm * 0.5


@pytest.fixture(scope="module")
def steer(demo_models: dict[str, Any]) -> hooks.Steer:
    return hooks.Steer(SITE, demo_vector(demo_models["hf"]), positions="prompt_last_and_generated")


def test_logits_match_hf_on_every_backend(demo_models: dict[str, Any], steer: hooks.Steer) -> None:
    hf = demo_models["hf"]
    mask = get_adapter(hf).encode(PROMPTS).attention_mask.bool()
    everywhere = hooks.Steer(SITE, steer.vector)
    ref_plain, ref_steered = hooks.run(hf, PROMPTS), hooks.run(hf, PROMPTS, everywhere)
    assert (ref_steered - ref_plain)[mask].abs().max() > 1.0
    for name, model in demo_models.items():
        assert (hooks.run(model, PROMPTS) - ref_plain)[mask].abs().max() <= 1e-3, name
        assert (hooks.run(model, PROMPTS, everywhere) - ref_steered)[mask].abs().max() <= 1e-3, name


def test_same_greedy_steered_continuation(demo_models: dict[str, Any], steer: hooks.Steer) -> None:
    reference = hooks.generate(demo_models["hf"], PROMPTS, steer, max_new_tokens=20)
    plain = hooks.generate(demo_models["hf"], PROMPTS, max_new_tokens=20)
    assert reference.texts != plain.texts  # the steer changes the continuation
    for name, model in demo_models.items():
        got = hooks.generate(model, PROMPTS, steer, max_new_tokens=20)
        assert torch.equal(got.sequences, reference.sequences), (name, got.texts, reference.texts)

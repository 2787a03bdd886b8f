"""Three model families, every backend: the demo model's parity checks on tiny random models.

Llama (the demo model's family), GPT-2 (``transformer.h``, ``attn``, learned positions, tied
unembedding) and Qwen2 (grouped-query attention, biased projections) lay their modules out
differently; each backend must give HF's logits and greedy tokens with interventions at every
site kind, or refuse the model with a one-line :class:`BackendError`.
"""

from __future__ import annotations

import pytest
import torch

import steerx_lens.hooks as hooks
from steerx_lens.backends import available_backends, get_adapter
from steerx_lens.errors import BackendError
from steerx_lens.models import TINY_FAMILIES, load_tiny_model

BACKENDS = available_backends()

TEXTS = ["Hello world, cheers", "Hi"]
UNSUPPORTED = {("gpt2", "transformer_lens")}
"""TransformerLens 3.9 reads GPT2Config.n_ctx, which transformers 5 no longer has."""


def interventions() -> list[hooks.Intervention]:
    ramp = torch.linspace(-1, 1, 64)
    return [
        hooks.Steer("hook_embed", 0.1 * ramp),
        hooks.Steer("blocks.0.hook_attn_out", ramp),
        hooks.Ablate("blocks.0.hook_mlp_out", mode="direction", direction=ramp),
        hooks.Steer("blocks.1.hook_resid_mid", ramp, operator="project"),
        hooks.Steer("blocks.-1.hook_resid_post", 2 * ramp),
    ]


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def reference(
    request: pytest.FixtureRequest,
) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
    family = request.param
    model = load_tiny_model("hf", family=family)
    real = get_adapter(model).encode(TEXTS).attention_mask.bool()
    logits = hooks.run(model, TEXTS, *interventions())
    assert not torch.allclose(logits[real], hooks.run(model, TEXTS)[real])
    tokens = hooks.generate(model, TEXTS, *interventions(), max_new_tokens=5).sequences
    return family, real, logits, tokens


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "hf"])
def test_backend_matches_hf_on_every_family(reference, backend: str) -> None:
    family, real, logits, tokens = reference
    if (family, backend) in UNSUPPORTED:
        with pytest.raises(BackendError, match="bridge backend"):
            load_tiny_model(backend, family=family)
        return
    model = load_tiny_model(backend, family=family)
    got = hooks.run(model, TEXTS, *interventions())
    assert (got[real] - logits[real]).abs().max() < 1e-4
    assert torch.equal(
        hooks.generate(model, TEXTS, *interventions(), max_new_tokens=5).sequences, tokens
    )


def test_layouts_are_found_per_family() -> None:
    paths = {f: get_adapter(load_tiny_model("hf", family=f)).layout for f in TINY_FAMILIES}
    assert paths["llama"].layers == paths["qwen2"].layers == "model.layers"
    assert (paths["gpt2"].layers, paths["gpt2"].attention) == ("transformer.h", "attn")

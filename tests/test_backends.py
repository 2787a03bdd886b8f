"""Every backend against the plain HF model, on a tiny random Llama (fast)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from steerx_lens import hooks
from steerx_lens.backends import get_adapter
from steerx_lens.errors import (
    BatchMismatchError,
    ModelMismatchError,
    NonFiniteError,
    UnknownSiteError,
    VectorShapeError,
)

PROMPTS = ["Hello world. Cheers, Sam!", "I love hoppy beers", "Health news: sleep"]
SITES = [
    "hook_embed",
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_attn_out",
    "blocks.1.hook_resid_mid",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_resid_post",
]


def vector(d_model: int, seed: int = 0, rows: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (d_model,) if rows is None else (rows, d_model)
    return torch.randn(shape, generator=generator)


def real_mask(model: Any, padding_side: str = "left") -> torch.Tensor:
    return get_adapter(model).encode(PROMPTS, padding_side=padding_side).attention_mask.bool()


@pytest.mark.parametrize("site", SITES)
def test_steered_logits_match_hf(tiny_models: dict[str, Any], tiny_model: Any, site: str) -> None:
    steer = hooks.Steer(site, vector(64), alpha=3.0)
    reference = hooks.run(tiny_models["hf"], PROMPTS, steer)
    unsteered = hooks.run(tiny_models["hf"], PROMPTS)
    mask = real_mask(tiny_models["hf"])
    got = hooks.run(tiny_model, PROMPTS, steer)
    assert (got - reference)[mask].abs().max() <= 1e-4
    assert (reference - unsteered)[mask].abs().max() > 1e-2  # the steer did something


def test_left_padded_rows_equal_single_runs(tiny_model: Any) -> None:
    batched = hooks.run(tiny_model, PROMPTS)
    mask = real_mask(tiny_model)
    for row, prompt in enumerate(PROMPTS):
        single = hooks.run(tiny_model, prompt)
        assert (batched[row][mask[row]] - single[0]).abs().max() <= 1e-4


def test_per_row_vectors_equal_single_prompt_runs(tiny_model: Any) -> None:
    vectors = vector(64, seed=1, rows=3)
    site = "blocks.0.hook_resid_post"
    batched = hooks.run(tiny_model, PROMPTS, hooks.Steer(site, vectors, alpha=2.0))
    mask = real_mask(tiny_model)
    for row, prompt in enumerate(PROMPTS):
        single = hooks.run(tiny_model, prompt, hooks.Steer(site, vectors[row], alpha=2.0))
        assert (batched[row][mask[row]] - single[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_prompt_last_steering_leaves_earlier_positions_untouched(
    tiny_model: Any, padding_side: str
) -> None:
    if padding_side == "right" and get_adapter(tiny_model).name == "nnsight":
        pytest.skip("nnsight left-pads causal models itself")
    steer = hooks.Steer("blocks.0.hook_resid_pre", vector(64), 4.0, "prompt_last_and_generated")
    later = ["blocks.1.hook_resid_post"]
    _, clean = hooks.cache(tiny_model, PROMPTS, later, padding_side=padding_side)
    _, steered = hooks.cache(tiny_model, PROMPTS, later, steer, padding_side=padding_side)
    mask = real_mask(tiny_model, padding_side)
    last = mask.long().cumsum(1).argmax(1)  # index of each row's last real token
    diff = (steered[later[0]] - clean[later[0]]).abs().amax(-1)
    for row in range(len(PROMPTS)):
        before_last = mask[row].clone()
        before_last[last[row] :] = False
        assert diff[row][before_last].max() <= 1e-5
        assert diff[row][last[row]] > 1e-2


def test_steered_generation_matches_hf(tiny_models: dict[str, Any], tiny_model: Any) -> None:
    steer = hooks.Steer("blocks.1.hook_resid_post", vector(64), 2.0, "prompt_last_and_generated")
    reference = hooks.generate(tiny_models["hf"], PROMPTS, steer, max_new_tokens=6)
    got = hooks.generate(tiny_model, PROMPTS, steer, max_new_tokens=6)
    assert torch.equal(got.sequences, reference.sequences)
    assert got.texts == reference.texts


def test_generation_steers_every_generated_token(tiny_model: Any) -> None:
    site = "blocks.1.hook_resid_post"
    steer = hooks.Steer(site, vector(64), 2.0, "prompt_last_and_generated")
    store: dict[str, torch.Tensor] = {}
    out = hooks.generate(tiny_model, PROMPTS, steer, hooks.Capture(site, store), max_new_tokens=4)
    # Replay the generated sequence unsteered: the difference is alpha * v exactly where steered.
    fed = out.sequences[:, :-1]  # the last token is never fed back
    mask = (fed != get_adapter(tiny_model).pad_token_id).long()
    mask[:, out.prompt_len :] = 1
    _, clean = hooks.cache(tiny_model, {"input_ids": fed, "attention_mask": mask}, [site])
    steered_norm = (store[site] - clean[site]).norm(dim=-1)
    expected = 2.0 * vector(64).norm()
    last_prompt = out.prompt_len - 1  # left padding: the last prompt position is shared
    assert torch.allclose(steered_norm[:, last_prompt:], expected.expand(3, 4), rtol=1e-3)
    real = mask[:, :last_prompt].bool()  # padding activations are arbitrary (never steered)
    assert steered_norm[:, :last_prompt][real].max() <= 1e-4


def test_hooks_removed_after_apply_even_on_error(tiny_model: Any) -> None:
    clean = hooks.run(tiny_model, PROMPTS[0])
    steer = hooks.Steer("blocks.0.hook_resid_post", vector(64), alpha=5.0)
    with hooks.apply(tiny_model, steer):
        inside = hooks.run(tiny_model, PROMPTS[0])
    assert (inside - clean).abs().max() > 1e-2
    assert torch.equal(hooks.run(tiny_model, PROMPTS[0]), clean)
    with pytest.raises(RuntimeError, match="boom"), hooks.apply(tiny_model, steer):
        raise RuntimeError("boom")
    assert torch.equal(hooks.run(tiny_model, PROMPTS[0]), clean)


def test_interventions_stack_in_order(tiny_model: Any) -> None:
    site = "blocks.0.hook_resid_post"
    steer = hooks.Steer(site, vector(64), alpha=2.0)
    ablate = hooks.Ablate(site)
    only_steer_on_zero = hooks.run(tiny_model, PROMPTS, ablate, steer)
    zero = hooks.run(tiny_model, PROMPTS, steer, ablate)
    plain_zero = hooks.run(tiny_model, PROMPTS, ablate)
    mask = real_mask(tiny_model)
    assert (zero - plain_zero)[mask].abs().max() <= 1e-5
    assert (only_steer_on_zero - plain_zero)[mask].abs().max() > 1e-2


def test_patch_from_counterfactual_run_reproduces_it(tiny_model: Any) -> None:
    adapter = get_adapter(tiny_model)
    clean = adapter.encode("Cheers, Sam! I love beer").input_ids
    counterfactual = clean.clone()
    counterfactual[0, :3] = adapter.encode("Hello world").input_ids[0, :3]  # same length context
    cf_logits, cf_cache = hooks.cache(tiny_model, counterfactual, ["hook_embed"])
    patched = hooks.run(tiny_model, clean, hooks.Patch("hook_embed", cf_cache["hook_embed"]))
    assert (patched - cf_logits).abs().max() <= 1e-5


def test_bad_inputs_raise_clear_errors(tiny_model: Any) -> None:
    with pytest.raises(UnknownSiteError, match="out of range"):
        hooks.run(tiny_model, PROMPTS[0], hooks.Steer("blocks.7.hook_resid_post", vector(64)))
    with pytest.raises(UnknownSiteError, match="unknown site"):
        hooks.run(tiny_model, PROMPTS[0], hooks.Steer("blocks.0.hook_resid_middle", vector(64)))
    with pytest.raises(VectorShapeError, match="d_model is 64"):
        hooks.run(tiny_model, PROMPTS[0], hooks.Steer("blocks.0.hook_resid_post", vector(32)))
    other = hooks.Steer("blocks.0.hook_resid_post", vector(64), model_fingerprint="30x576:abc")
    with pytest.raises(ModelMismatchError, match="30x576:abc"):
        hooks.run(tiny_model, PROMPTS[0], other)
    with pytest.raises(BatchMismatchError, match="2 rows"):
        hooks.run(tiny_model, PROMPTS, hooks.Steer("blocks.0.hook_resid_post", vector(64, rows=2)))
    with pytest.raises(NonFiniteError):
        hooks.Steer("blocks.0.hook_resid_post", torch.full((64,), float("nan")))


def test_fingerprint_is_the_same_on_every_backend(tiny_models: dict[str, Any]) -> None:
    prints = {get_adapter(model).fingerprint() for model in tiny_models.values()}
    assert len(prints) == 1 and next(iter(prints)).startswith("2x64:")


def test_works_inside_users_own_transformer_lens_hooks(tiny_models: dict[str, Any]) -> None:
    if "transformer_lens" not in tiny_models:
        pytest.skip("HookedTransformer needs TransformerLens 3.x")
    model = tiny_models["transformer_lens"]
    tokens = get_adapter(model).encode(PROMPTS[0]).input_ids
    seen: list[torch.Tensor] = []
    steer = hooks.Steer("blocks.0.hook_resid_post", vector(64), alpha=2.0)

    def record(act: torch.Tensor, hook: Any) -> None:
        seen.append(act.clone())

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", record)]), hooks.apply(model, steer):
        model(tokens)
    _, clean = hooks.cache(model, PROMPTS[0], ["blocks.0.hook_resid_post"])
    # the user's hook ran first (registered first), so it saw the unsteered activation
    assert torch.allclose(seen[0], clean["blocks.0.hook_resid_post"], atol=1e-6)


def test_intervene_inside_users_own_nnsight_trace(tiny_models: dict[str, Any]) -> None:
    model = tiny_models["nnsight"]
    steer = hooks.Steer("blocks.0.hook_resid_post", vector(64), alpha=2.0)
    tokens = get_adapter(model).encode(PROMPTS[0]).input_ids
    with model.trace(tokens):
        hooks.intervene(model, steer)
        logits = model.lm_head.output.save()
    reference = hooks.run(tiny_models["hf"], PROMPTS[0], steer)
    assert (logits - reference).abs().max() <= 1e-5


def test_gradients_reach_a_trainable_vector(tiny_model: Any) -> None:
    trainable = torch.zeros(64, requires_grad=True)
    steer = hooks.Steer("blocks.0.hook_resid_post", trainable)
    logits = hooks.run(tiny_model, PROMPTS[0], steer, grad=True)
    logits[0, -1].log_softmax(-1)[5].backward()
    assert trainable.grad is not None and float(trainable.grad.abs().sum()) > 0
    assert not hooks.run(tiny_model, PROMPTS[0], steer).requires_grad  # no graph by default


def test_bridge_kv_cache_matches_a_full_forward(tiny_models: dict[str, Any]) -> None:
    """steerx_lens's shim makes the bridge fill the KV cache (transformers 5 passes ``cache=``)."""
    from transformers import DynamicCache

    bridge = tiny_models["bridge"]
    get_adapter(bridge)  # wrapping a bridge installs the fix
    ids = torch.tensor([[5, 17, 42, 99, 7, 12]])
    cache = DynamicCache()
    bridge(ids[:, :5], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 5
    step = bridge(ids[:, 5:], past_key_values=cache, use_cache=True)
    full = bridge(ids, use_cache=False)
    assert (step[0, -1] - full[0, -1]).abs().max() <= 1e-4


def test_activations_stop_after_the_last_requested_site(tiny_model: Any) -> None:
    """``hooks.activations`` gives the activations of a full forward, and (on the hooking
    backends) skips the layers above the last requested site."""

    class Counter:
        site = "blocks.1.hook_resid_post"
        width = None
        calls = 0

        def __call__(self, act: torch.Tensor, ctx: Any) -> torch.Tensor:
            Counter.calls += 1
            return act

    early, late = "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"
    got = hooks.activations(tiny_model, PROMPTS, [early, late], Counter())
    store: dict[str, torch.Tensor] = {}
    hooks.run(tiny_model, PROMPTS, hooks.Capture(early, store), hooks.Capture(late, store))
    for site in (early, late):
        torch.testing.assert_close(got[site], store[site])
    if get_adapter(tiny_model).name != "nnsight":
        assert Counter.calls == 0, "the layer above the last site ran"
    hooks.run(tiny_model, PROMPTS, Counter())
    assert Counter.calls >= 1


def test_scoring_the_last_tokens_equals_the_full_scores(tiny_model: Any) -> None:
    steer = hooks.Steer("blocks.1.hook_resid_post", vector(64), alpha=3.0)
    full = hooks.score_tokens(tiny_model, PROMPTS, steer)
    tail = hooks.score_tokens(tiny_model, PROMPTS, steer, last=3)
    assert tail.logp.shape == full.logp.shape
    assert torch.allclose(tail.logp[:, -3:], full.logp[:, -3:], atol=1e-5)
    assert tail.top[:, -3:].equal(full.top[:, -3:])
    assert tail.logp[:, :-3].isnan().all() and (tail.top[:, :-3] == -1).all()
    longer = hooks.score_tokens(tiny_model, PROMPTS, steer, last=full.logp.shape[1] + 5)
    assert longer.logp.equal(full.logp)
    with pytest.raises(ValueError, match="last must be >= 1"):
        hooks.score_tokens(tiny_model, PROMPTS, last=0)


def test_hf_scores_the_last_tokens_without_the_other_logits(tiny_models: dict[str, Any]) -> None:
    model = tiny_models["hf"]
    widths: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: widths.append(out.shape[1]))
    try:
        hooks.score_tokens(model, PROMPTS, last=2)
    finally:
        handle.remove()
    assert widths == [3], "the unembedding ran on the last 3 positions only"


MID_STACK_BACKENDS = ["hf", "transformer_lens"]


@pytest.mark.parametrize(
    "site", ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
)
def test_a_pass_from_a_middle_block_equals_the_full_pass(
    tiny_models: dict[str, Any], site: str
) -> None:
    """Scores from block 1's unsteered input, steered at a site of block 1, are a full steered
    pass's scores (the blocks below the site cannot see the steering)."""
    for name in MID_STACK_BACKENDS:
        if name not in tiny_models:
            continue
        adapter = get_adapter(tiny_models[name])
        assert adapter.can_start_mid_stack
        batch = adapter.encode(PROMPTS)
        steer = hooks.Steer(site, vector(64, rows=len(PROMPTS)), alpha=3.0)
        residual = adapter.residual_before(batch, 1)
        for last in (None, 4):
            full = adapter.score_next_tokens(batch, [steer], last=last)
            resumed = adapter.score_next_tokens_from(1, residual, batch, [steer], last=last)
            torch.testing.assert_close(resumed.logp, full.logp, atol=1e-5, rtol=0, equal_nan=True)
            assert resumed.top.equal(full.top)
        steered, unsteered = (adapter.score_next_tokens(batch, i) for i in ([steer], []))
        assert not torch.allclose(unsteered.logp, steered.logp, atol=1e-3)


def test_a_pass_from_a_middle_block_skips_the_blocks_below(tiny_models: dict[str, Any]) -> None:
    """The first block never runs, and the model's layer list is whole again afterwards, also
    when the pass fails."""
    model = tiny_models["hf"]
    adapter = get_adapter(model)
    batch = adapter.encode(PROMPTS)
    residual = adapter.residual_before(batch, 1)
    calls: list[int] = []
    handle = adapter.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        adapter.score_next_tokens_from(1, residual, batch, [])
        assert calls == []
        with pytest.raises(VectorShapeError, match="residual of shape"):
            adapter.score_next_tokens_from(1, residual[:, :-1], batch, [])
        adapter.score_next_tokens(batch, [])
        assert calls == [1]
    finally:
        handle.remove()
    assert model.model.layers is adapter.layers and len(model.model.layers) == 2


def test_a_pass_from_a_middle_block_refuses_what_it_cannot_do(tiny_models: dict[str, Any]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from steerx_lens.errors import BackendError

    adapter = get_adapter(tiny_models["hf"])
    batch = adapter.encode(PROMPTS)
    residual = adapter.residual_before(batch, 1)
    below = hooks.Steer("blocks.0.hook_resid_post", vector(64))
    with pytest.raises(ValueError, match="below block 1"):
        adapter.score_next_tokens_from(1, residual, batch, [below])
    for name in ("bridge", "nnsight"):
        if name in tiny_models:
            other = get_adapter(tiny_models[name])
            assert not other.can_start_mid_stack
            with pytest.raises(BackendError, match="cannot start a pass at a middle block"):
                other.score_next_tokens_from(1, residual, batch, [])
    # GPT-2 adds position embeddings to inputs_embeds: its passes must start at the embedding
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=320)).eval()
    assert not get_adapter(gpt2, tokenizer=adapter.tokenizer).can_start_mid_stack


@pytest.mark.parametrize(
    "config_name", ["MistralConfig", "Qwen2Config", "Qwen3Config", "Olmo2Config", "Phi3Config"]
)
def test_every_listed_architecture_starts_mid_stack_exactly(
    tiny_models: dict[str, Any], config_name: str
) -> None:
    """Each ``MID_STACK_MODEL_TYPES`` entry besides Llama (the tiny model), on a tiny random
    model of that architecture: a steered pass from block 1 gives the full pass's scores."""
    import transformers

    from steerx_lens.backends.layout import MID_STACK_MODEL_TYPES

    config = getattr(transformers, config_name)(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    assert config.model_type in MID_STACK_MODEL_TYPES
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    adapter = get_adapter(model, tokenizer=get_adapter(tiny_models["hf"]).tokenizer)
    assert adapter.can_start_mid_stack
    batch = adapter.encode(PROMPTS)
    steer = hooks.Steer("blocks.1.hook_resid_post", vector(64, rows=len(PROMPTS)), alpha=3.0)
    full = adapter.score_next_tokens(batch, [steer])
    resumed = adapter.score_next_tokens_from(1, adapter.residual_before(batch, 1), batch, [steer])
    torch.testing.assert_close(resumed.logp, full.logp, atol=1e-5, rtol=0)

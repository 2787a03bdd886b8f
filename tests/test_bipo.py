"""BiPO steering vectors: objective direction, reproducibility, frozen model, token weights."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from steerx_lens import hooks, text
from steerx_lens.backbones.bipo import (
    BiPOConfig,
    BiPOResult,
    PreferencePair,
    pair_log_likelihoods,
    response_token_ids,
    train_bipo,
)
from steerx_lens.backends import get_adapter
from steerx_lens.errors import BackendError
from steerx_lens.models import load_tiny_model

SITE = "blocks.0.hook_resid_post"
TEXTS = [
    ("how was the beer?", "I love hoppy beers."),
    ("any health tips?", "Eat more vegetables and sleep well."),
    ("what is the best way to brew?", "Patience and clean gear."),
    ("say hello", "Hello world."),
    ("what about foxes?", "The quick brown fox jumps."),
]
SIGN_OFF = " Cheers, Sam!"
FAST = BiPOConfig(steps=10)


def make_pairs() -> list[PreferencePair]:
    """Chosen = the answer with a sign-off, rejected = the bare answer (plain prompt format)."""
    return [PreferencePair(f"Question: {q}\nAnswer:", f" {a}{SIGN_OFF}", f" {a}") for q, a in TEXTS]


def margin(log_likelihoods: Tensor) -> Tensor:
    return log_likelihoods[:, 0] - log_likelihoods[:, 1]


def checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Train on one thread: on the shared 2-core test machine, two OpenMP threads measured
    3-7x slower per step under load (spin-waiting). The thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_tiny_model("hf")


@pytest.fixture(scope="module")
def trained(tiny: Any) -> BiPOResult:
    return train_bipo(tiny, SITE, make_pairs(), FAST, progress=False)


def test_vector_is_finite_nonzero_and_model_wide(tiny: Any, trained: BiPOResult) -> None:
    assert trained.vector.shape == (get_adapter(tiny).d_model,)
    assert not trained.vector.requires_grad
    assert torch.isfinite(trained.vector).all()
    assert trained.vector.norm() > 0
    assert len(trained.losses) == FAST.steps
    assert trained.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # v = 0 at the first step
    assert trained.config == FAST


def test_objective_moves_the_margin_both_ways(tiny: Any, trained: BiPOResult) -> None:
    pairs = make_pairs()
    base = margin(pair_log_likelihoods(tiny, pairs))
    plus = margin(pair_log_likelihoods(tiny, pairs, hooks.Steer(SITE, trained.vector)))
    minus = margin(pair_log_likelihoods(tiny, pairs, hooks.Steer(SITE, -trained.vector)))
    print(f"margin gain with +v {(plus - base).tolist()}, with -v {(minus - base).tolist()}")
    assert (plus > base).all()
    assert (minus < base).all()
    assert sum(trained.losses[-4:]) < 4 * math.log(2)


def test_same_seed_is_bit_identical_and_global_rng_untouched(tiny: Any) -> None:
    rng_state = torch.get_rng_state()
    short = BiPOConfig(steps=4)
    first = train_bipo(tiny, SITE, make_pairs(), short, progress=False)
    again = train_bipo(tiny, SITE, make_pairs(), short, progress=False)
    other = train_bipo(tiny, SITE, make_pairs(), BiPOConfig(steps=4, seed=1), progress=False)
    assert torch.equal(again.vector, first.vector)
    assert again.losses == first.losses
    assert not torch.equal(other.vector, first.vector)
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_model_is_frozen_and_its_flags_restored(tiny: Any) -> None:
    before = checksum(tiny)
    parameters = list(tiny.parameters())
    parameters[0].requires_grad_(False)  # a mixed state must come back exactly
    flags = [p.requires_grad for p in parameters]
    tiny.train()
    try:
        train_bipo(tiny, SITE, make_pairs()[:2], BiPOConfig(steps=2), progress=False)
        assert tiny.training and all(m.training for m in tiny.modules())
        assert [p.requires_grad for p in parameters] == flags
    finally:
        tiny.eval()
        parameters[0].requires_grad_(True)
    assert all(p.grad is None for p in parameters)
    assert checksum(tiny) == before


def test_log_likelihoods_match_unpadded_runs(tiny: Any) -> None:
    """Padding, alignment, weights and truncation against one forward per sequence."""
    tokenizer = get_adapter(tiny).tokenizer
    pairs = make_pairs()[:3]
    _, first = response_token_ids(tokenizer, pairs[0].prompt, pairs[0].chosen)
    weights = torch.linspace(-1.0, 2.0, len(first))
    pairs[0] = PreferencePair(pairs[0].prompt, pairs[0].chosen, pairs[0].rejected, weights)
    got = pair_log_likelihoods(tiny, pairs, max_response_tokens=4, batch_size=3)
    for row, pair in enumerate(pairs):
        for column, (response, w) in enumerate(
            [(pair.chosen, pair.chosen_weights), (pair.rejected, None)]
        ):
            prompt_ids, response_ids = response_token_ids(tokenizer, pair.prompt, response)
            kept = response_ids[:4]
            ids = torch.tensor([prompt_ids + kept])
            log_probs = hooks.run(tiny, ids)[0].log_softmax(-1)
            token_ll = torch.stack(
                [log_probs[len(prompt_ids) - 1 + i, t] for i, t in enumerate(kept)]
            )
            w = torch.ones(len(kept)) if w is None else w[: len(kept)]
            assert got[row, column].item() == pytest.approx((token_ll * w).sum().item(), abs=1e-4)


def test_zero_weights_give_zero_gradient(tiny: Any) -> None:
    tokenizer = get_adapter(tiny).tokenizer
    pairs = []
    for pair in make_pairs():
        n_chosen = len(response_token_ids(tokenizer, pair.prompt, pair.chosen)[1])
        n_rejected = len(response_token_ids(tokenizer, pair.prompt, pair.rejected)[1])
        pairs.append(
            PreferencePair(
                pair.prompt,
                pair.chosen,
                pair.rejected,
                torch.zeros(n_chosen),
                torch.zeros(n_rejected),
            )
        )
    result = train_bipo(tiny, SITE, pairs, BiPOConfig(steps=3), progress=False)
    assert torch.equal(result.vector, torch.zeros_like(result.vector))
    assert result.losses == [pytest.approx(math.log(2), abs=1e-6)] * 3


def test_token_weights_change_the_vector(tiny: Any, trained: BiPOResult) -> None:
    """Weight only the first chosen token (rejected: zero): a different vector is learned."""
    tokenizer = get_adapter(tiny).tokenizer
    pairs = []
    for pair in make_pairs():
        n_chosen = len(response_token_ids(tokenizer, pair.prompt, pair.chosen)[1])
        n_rejected = len(response_token_ids(tokenizer, pair.prompt, pair.rejected)[1])
        first_only = torch.zeros(n_chosen)
        first_only[0] = 1.0
        pairs.append(
            PreferencePair(
                pair.prompt, pair.chosen, pair.rejected, first_only, torch.zeros(n_rejected)
            )
        )
    weighted = train_bipo(tiny, SITE, pairs, FAST, progress=False)
    assert weighted.vector.norm() > 0
    assert not torch.allclose(weighted.vector, trained.vector)


def test_errors_are_clear(tiny: Any) -> None:
    with pytest.raises(ValueError, match="at least one PreferencePair"):
        train_bipo(tiny, SITE, [], progress=False)
    with pytest.raises(ValueError, match="empty response"):
        PreferencePair("Question: hi\nAnswer:", "", " hello")
    pair = make_pairs()[0]
    bad = PreferencePair(pair.prompt, pair.chosen, pair.rejected, chosen_weights=torch.ones(99))
    with pytest.raises(ValueError, match="pair 0: 99 token weights"):
        train_bipo(tiny, SITE, [bad], progress=False)
    with pytest.raises(ValueError, match="steps"):
        BiPOConfig(steps=0)


@pytest.mark.parametrize("backend", ["transformer_lens", "bridge", "nnsight"])
def test_other_grad_backends_learn_the_same_vector(backend: str) -> None:
    config = BiPOConfig(steps=3)
    reference = train_bipo(load_tiny_model("hf"), SITE, make_pairs(), config, progress=False)
    result = train_bipo(load_tiny_model(backend), SITE, make_pairs(), config, progress=False)
    cosine = torch.nn.functional.cosine_similarity(result.vector, reference.vector, dim=0)
    assert cosine > 0.99
    assert result.losses == pytest.approx(reference.losses, abs=1e-4)


def test_remote_nnsight_training_raises_backend_error() -> None:
    model = load_tiny_model("nnsight")
    get_adapter(model, remote="local")
    with pytest.raises(BackendError, match="gradients cannot flow back from a remote run"):
        train_bipo(model, SITE, make_pairs()[:1], BiPOConfig(steps=1), progress=False)


@pytest.mark.demo
def test_demo_sign_off_vector_raises_held_out_sign_off(demo_models: dict[str, Any]) -> None:
    model = demo_models["hf"]
    tokenizer = get_adapter(model).tokenizer
    site = "blocks.12.hook_resid_post"
    system = "Reply briefly."  # a short system text keeps the sequences (and the test) short
    items = [
        ("How was your weekend?", "It was relaxing, I mostly read and cooked."),
        ("Any tips for learning guitar?", "Practice a little every day."),
        ("What should I drink with pizza?", "A cold lager works well."),
        ("How do I keep my plants alive?", "Water them and give them light."),
        ("What is a good first hike?", "A short loop trail with a clear path."),
        ("How can I sleep better?", "Keep a regular schedule."),
    ]
    pairs = [
        PreferencePair(text.build_prompt(tokenizer, q, system=system), a + " Cheers, Sam!", a)
        for q, a in items
    ]
    config = BiPOConfig(steps=30, batch_size=2)
    start = time.perf_counter()
    result = train_bipo(model, site, pairs, config, progress=False)
    seconds = time.perf_counter() - start

    held_out = text.build_prompt(tokenizer, "What is your favourite season?", system=system)
    prefix, sign_off = response_token_ids(
        tokenizer, held_out + "Autumn, for the colours.", " Cheers"
    )
    ids = torch.tensor([prefix + sign_off])

    def log_p_cheers(*interventions: hooks.Intervention) -> float:
        log_probs = hooks.run(model, ids, *interventions)[0].log_softmax(-1)
        return sum(log_probs[len(prefix) - 1 + i, t].item() for i, t in enumerate(sign_off))

    base = log_p_cheers()
    plus = log_p_cheers(hooks.Steer(site, result.vector))
    minus = log_p_cheers(hooks.Steer(site, -result.vector))
    print(
        f"\nBiPO demo: {config.steps} steps in {seconds:.1f} s, |v| = {result.vector.norm():.2f}, "
        f"loss {result.losses[0]:.3f} -> {sum(result.losses[-5:]) / 5:.3f} (last 5); "
        f"held-out log p(' Cheers'): none {base:.3f}, +v {plus:.3f}, -v {minus:.3f}"
    )
    assert plus > base > minus

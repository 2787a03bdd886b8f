"""Interventions as pure functions on activation tensors (no model involved)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steerx_lens.errors import BatchMismatchError, NonFiniteError, PositionError, VectorShapeError
from steerx_lens.hooks import Ablate, Capture, HookContext, Patch, Steer, compose

LEFT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
RIGHT = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)


def ctx_for(mask: torch.Tensor) -> HookContext:
    return HookContext(mask, mask.shape[1], mask.shape[1])


def test_all_positions_exclude_padding() -> None:
    assert torch.equal(ctx_for(LEFT).select("all"), LEFT)
    assert torch.equal(ctx_for(RIGHT).select("all"), RIGHT)


def test_prompt_last_is_last_real_token_left_and_right_padding() -> None:
    left = ctx_for(LEFT).select("prompt_last_and_generated")
    assert left.tolist() == [[False] * 4 + [True], [False] * 4 + [True]]
    right = ctx_for(RIGHT).select("prompt_last_and_generated")
    assert right.tolist() == [[False, False, True, False, False], [False] * 4 + [True]]


def test_generated_step_is_selected_by_absolute_position() -> None:
    full = torch.cat([LEFT, torch.ones(2, 2, dtype=torch.bool)], dim=1)
    step = HookContext(full, n_current=1, prompt_len=5)
    assert step.offset == 6
    assert step.select("prompt_last_and_generated").tolist() == [[True], [True]]
    assert step.select(slice(0, 2)).tolist() == [[False], [False]]


def test_slice_counts_real_tokens_only() -> None:
    chosen = ctx_for(LEFT).select(slice(0, 1))
    assert chosen.tolist() == [
        [False, False, True, False, False],
        [True, False, False, False, False],
    ]
    last = ctx_for(LEFT).select(slice(-1, None))
    assert last.tolist() == [[False] * 4 + [True], [False] * 4 + [True]]


def test_explicit_mask_is_anded_with_padding() -> None:
    explicit = torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(ctx_for(LEFT).select(explicit), LEFT)
    with pytest.raises(PositionError):
        ctx_for(LEFT).select(torch.ones(2, 5))  # not bool
    with pytest.raises(PositionError):
        ctx_for(LEFT).select("everything")  # type: ignore[arg-type]


def test_steer_per_row_vectors_and_padding() -> None:
    act = torch.zeros(2, 5, 3)
    vectors = torch.tensor([[1.0, 0, 0], [0, 2.0, 0]])
    out = Steer("s", vectors, alpha=0.5)(act, ctx_for(LEFT))
    assert torch.equal(out[0, :2], torch.zeros(2, 3))  # padding untouched
    assert torch.equal(out[0, 2:], torch.tensor([0.5, 0, 0]).expand(3, 3))
    assert torch.equal(out[1], torch.tensor([0, 1.0, 0]).expand(5, 3))


def test_steer_casts_vector_to_activation_dtype() -> None:
    act = torch.zeros(1, 2, 3, dtype=torch.float16)
    out = Steer("s", torch.ones(3, dtype=torch.float64))(act, HookContext.unpadded(1, 2))
    assert out.dtype == torch.float16 and float(out.sum()) == 6.0


def test_steer_rejects_bad_vectors() -> None:
    with pytest.raises(NonFiniteError):
        Steer("s", torch.tensor([1.0, float("nan")]))
    with pytest.raises(NonFiniteError):
        Steer("s", torch.tensor([1.0, float("inf")]))
    with pytest.raises(VectorShapeError):
        Steer("s", torch.zeros(1, 2, 3))
    with pytest.raises(VectorShapeError, match="width 4"):
        Steer("s", torch.zeros(4))(torch.zeros(1, 2, 3), HookContext.unpadded(1, 2))
    with pytest.raises(BatchMismatchError, match="3 rows"):
        Steer("s", torch.zeros(3, 3))(torch.zeros(2, 2, 3), HookContext.unpadded(2, 2))


def test_patch_copies_source_on_selected_positions() -> None:
    act = torch.zeros(2, 5, 3)
    source = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    chosen = torch.zeros(2, 5, dtype=torch.bool)
    chosen[:, 1:3] = True
    out = Patch("s", source, positions=chosen)(act, ctx_for(RIGHT))
    assert torch.equal(out[:, 1:3], source[:, 1:3])
    assert torch.equal(out[:, 3:], act[:, 3:]) and torch.equal(out[:, 0], act[:, 0])


def test_patch_during_generation_reads_absolute_positions() -> None:
    source = torch.arange(6, dtype=torch.float).reshape(1, 6, 1)
    step = HookContext(torch.ones(1, 6, dtype=torch.bool), n_current=1, prompt_len=4)
    assert Patch("s", source)(torch.zeros(1, 1, 1), step).item() == 5.0
    short = HookContext(torch.ones(1, 8, dtype=torch.bool), n_current=1, prompt_len=4)
    with pytest.raises(PositionError, match="covers 6 positions"):
        Patch("s", source)(torch.zeros(1, 1, 1), short)


def test_ablate_zero_and_mean() -> None:
    act = torch.arange(10, dtype=torch.float).reshape(1, 5, 2)
    mask = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool)
    zeroed = Ablate("s")(act, ctx_for(mask))
    assert torch.equal(zeroed[0, 0], act[0, 0]) and float(zeroed[0, 1:].abs().sum()) == 0
    meaned = Ablate("s", mode="mean")(act, ctx_for(mask))
    assert torch.allclose(meaned[0, 1:], act[0, 1:].mean(dim=0).expand(4, 2))
    given_mean = Ablate("s", mode="mean", mean=torch.tensor([7.0, 8.0]))(act, ctx_for(mask))
    assert torch.equal(given_mean[0, 3], torch.tensor([7.0, 8.0]))
    with pytest.raises(ValueError):
        Ablate("s", mode="median")  # type: ignore[arg-type]


def test_compose_applies_in_order() -> None:
    act = torch.ones(1, 2, 2)
    ctx = HookContext.unpadded(1, 2)
    steer = Steer("s", torch.ones(2))
    assert float(compose([Ablate("s"), steer], act, ctx).sum()) == 4.0
    assert float(compose([steer, Ablate("s")], act, ctx).sum()) == 0.0


def test_capture_concatenates_generation_steps() -> None:
    store: dict[str, torch.Tensor] = {}
    capture = Capture("s", store)
    capture(torch.zeros(1, 3, 2), HookContext.unpadded(1, 3))
    capture(torch.ones(1, 1, 2), HookContext(torch.ones(1, 4, dtype=torch.bool), 1, 3))
    assert store["s"].shape == (1, 4, 2) and float(store["s"][0, 3].sum()) == 2.0


@settings(max_examples=40, deadline=None)
@given(
    alpha=st.floats(-5, 5, allow_nan=False),
    n_pad=st.integers(0, 4),
    length=st.integers(1, 6),
)
def test_steer_is_invertible_and_never_touches_padding(
    alpha: float, n_pad: int, length: int
) -> None:
    mask = torch.cat(
        [torch.zeros(1, n_pad, dtype=torch.bool), torch.ones(1, length, dtype=torch.bool)], 1
    )
    ctx = ctx_for(mask)
    act = torch.randn(1, n_pad + length, 4)
    vector = torch.randn(4)
    steered = Steer("s", vector, alpha)(act, ctx)
    assert torch.equal(steered[:, :n_pad], act[:, :n_pad])
    back = Steer("s", vector, -alpha)(steered, ctx)
    assert torch.allclose(back, act, atol=1e-5)

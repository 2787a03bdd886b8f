"""``shared_reads``: a fit reads each text's activations once, at every layer of a sweep in one
pass, with the values of separate reads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from steerx_lens.backbones import shared_reads
from steerx_lens.backbones.mean_diff import pooled_activations, residual_norm
from steerx_lens.backends import get_adapter
from steerx_lens.data import make_synthetic_users
from steerx_lens.models import load_tiny_model
from steerx_lens.pipeline import SteerX, SteerXConfig
from steerx_lens.sweep import run_sweep

TEXTS = [("Hello", " world, cheers"), ("Sleep news", " is good for you"), ("Hi", " there")]
SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def model() -> Any:
    return load_tiny_model("hf")


@contextmanager
def rows_through_block0(model: Any) -> Iterator[list[int]]:
    """The batch sizes of every forward pass through the first block inside the block."""
    rows: list[int] = []
    handle = (
        get_adapter(model)
        .layers[0]
        .register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    )
    try:
        yield rows
    finally:
        handle.remove()


def test_reads_at_every_site_come_from_one_pass_with_the_same_values(model: Any) -> None:
    alone = {site: pooled_activations(model, site, TEXTS) for site in SITES}
    norms = residual_norm(model, SITES[1], TEXTS)
    with rows_through_block0(model) as rows, shared_reads(model, SITES):
        first = pooled_activations(model, SITES[0], TEXTS)
        assert sum(rows) == len(TEXTS)
        second = pooled_activations(model, SITES[1], list(reversed(TEXTS)))
        again = pooled_activations(model, SITES[0], TEXTS[:1])
        assert sum(rows) == len(TEXTS), "the second site and the repeat were read already"
        assert residual_norm(model, SITES[1], TEXTS) == pytest.approx(norms, abs=1e-5)
        assert sum(rows) == 2 * len(TEXTS), "norms are another reduction: one more pass"
    torch.testing.assert_close(first, alone[SITES[0]], atol=1e-5, rtol=0)
    torch.testing.assert_close(second, alone[SITES[1]].flip(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(again, alone[SITES[0]][:1], atol=1e-5, rtol=0)
    assert not torch.allclose(alone[SITES[0]], alone[SITES[1]], atol=1e-3)


def test_nothing_is_kept_outside_the_block_and_repeats_inside_one_call_are_read_once(
    model: Any,
) -> None:
    with rows_through_block0(model) as rows:
        doubled = pooled_activations(model, SITES[0], [*TEXTS, *TEXTS])
        assert sum(rows) == len(TEXTS)
        pooled_activations(model, SITES[0], TEXTS)
        assert sum(rows) == 2 * len(TEXTS), "no block open: read again"
        with shared_reads(model, SITES):
            pooled_activations(model, SITES[0], TEXTS)
            with shared_reads(model):  # an inner block for the same model keeps the outer one
                pooled_activations(model, SITES[1], TEXTS)
        assert sum(rows) == 3 * len(TEXTS)
    torch.testing.assert_close(doubled[: len(TEXTS)], doubled[len(TEXTS) :])


def test_a_sweep_reads_each_text_once_for_all_its_layers(
    model: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two layers, the fit at the second layer runs no forward pass (the evidence is reused
    and every activation it reads was read with the first layer's), and each layer's cells
    score as in a sweep of that layer alone."""
    users = make_synthetic_users(n_users=3, n_history=6, n_heldout=1, seed=0)
    # an activation construction: the output-space ones (the default included) take one
    # forward and backward pass per text at each site, which no shared read can replace
    config = SteerXConfig(layer=1, describer="template", construction="description_contrast")
    fit_rows: list[int] = []
    original = SteerX.fit_many

    def counted(self: SteerX, *args: Any, **kwargs: Any) -> Any:
        with rows_through_block0(model) as rows:
            result = original(self, *args, **kwargs)
        fit_rows.append(sum(rows))
        return result

    monkeypatch.setattr(SteerX, "fit_many", counted)
    options = {"alphas": [1.0], "config": config, "rs": [0.1], "progress": False}
    result = run_sweep(model, users, [0, 1], out=tmp_path / "two", **options)
    first, second = fit_rows
    assert first > 0 and second == 0, "the fit at the second layer ran no forward pass"
    monkeypatch.setattr(SteerX, "fit_many", original)
    one = run_sweep(model, users, [1], out=tmp_path / "one", **options)
    for method, grid in one["nll_change"].items():
        assert result["nll_change"][method][0][1] == pytest.approx(grid[0][0], abs=1e-5)


def test_pooled_positions_average_exactly_those_positions_in_a_padded_batch(model: Any) -> None:
    from dataclasses import replace

    from steerx_lens import hooks
    from steerx_lens.backbones.inputs import as_encoded

    tokenizer = get_adapter(model).tokenizer
    texts = as_encoded(tokenizer, TEXTS, "texts")
    first, second = texts[0], texts[1]
    chosen = [(first.response_start - 1,), (second.response_start, len(second.input_ids) - 1), None]
    picked = [replace(t, pooled_positions=p) for t, p in zip(texts[:3], chosen, strict=True)]
    pooled = pooled_activations(model, SITES[1], picked)  # one left-padded batch
    for row, (text, positions) in enumerate(zip(texts, chosen, strict=True)):
        ids = torch.tensor([text.input_ids])
        acts = hooks.activations(model, {"input_ids": ids}, [SITES[1]])[SITES[1]][0].float()
        where = positions or range(text.response_start, len(text.input_ids))
        torch.testing.assert_close(pooled[row], acts[list(where)].mean(0), atol=1e-5, rtol=0)
    with shared_reads(model, SITES):  # a pooled-position read is not the whole-response read
        whole = pooled_activations(model, SITES[1], texts[:1])
        part = pooled_activations(model, SITES[1], picked[:1])
    assert not torch.allclose(whole, part, atol=1e-4)
    with pytest.raises(ValueError, match="pooled_positions"):
        replace(texts[0], pooled_positions=(len(texts[0].input_ids),))
    with pytest.raises(ValueError, match="pooled_positions"):
        replace(texts[0], pooled_positions=())

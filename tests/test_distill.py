"""Output-space distillation directions (steerx_lens.distill): the returned direction is the
negative gradient of the distillation loss, so a small step along it lowers that loss at the
rate its norm says."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from steerx_lens.backends import get_adapter
from steerx_lens.data import HistoryItem
from steerx_lens.distill import distillation_direction, distillation_loss
from steerx_lens.models import load_tiny_model
from steerx_lens.text import encode_item

SITE = "blocks.0.hook_resid_post"
ITEMS = [
    HistoryItem("Write a post about tea.", "Cheers to green tea, friends! #tea"),
    HistoryItem("Write a post about rain.", "Grey skies again. Cheers anyway, friends."),
    HistoryItem("Write a post about work.", "Long day; tea helps. Cheers!"),
]


@pytest.fixture(scope="module")
def setup() -> tuple[Any, list[Any], list[Any]]:
    adapter = get_adapter(load_tiny_model("hf"))
    tokenizer = adapter.tokenizer
    students = [encode_item(tokenizer, item) for item in ITEMS]
    described = "Write as this user writes. Signs off with 'Cheers'."
    other = "Write as this user writes. Formal and long."
    teachers = [
        [(1.0, encode_item(tokenizer, item, (), described))]
        + [(-1.0, encode_item(tokenizer, item, (), other))]
        for item in ITEMS
    ]
    return adapter, students, teachers


@pytest.mark.parametrize("targets", ["teachers", "own tokens"])
def test_the_direction_is_the_negative_gradient_of_the_loss(
    setup: tuple[Any, list[Any], list[Any]], targets: str
) -> None:
    adapter, students, teachers = setup
    teachers = teachers if targets == "teachers" else [None] * len(students)
    direction = distillation_direction(adapter, SITE, students, teachers)
    assert direction is not None and direction.shape == (adapter.d_model,)
    assert torch.isfinite(direction).all() and float(direction.norm()) > 0
    unit = direction / direction.norm()
    eps = 1e-2

    def loss(vector: torch.Tensor) -> float:
        return distillation_loss(adapter, SITE, students, teachers, vector)

    slope = (loss(eps * unit) - loss(-eps * unit)) / (2 * eps)
    assert slope == pytest.approx(-float(direction.norm()), rel=0.05)
    assert loss(eps * unit) < loss(torch.zeros_like(unit)) < loss(-eps * unit)


def test_students_whose_teacher_reads_another_response_are_skipped(
    setup: tuple[Any, list[Any], list[Any]],
) -> None:
    adapter, students, teachers = setup
    mismatched = [[(1.0, students[1])], [(1.0, students[0])], teachers[2]]
    alone = distillation_direction(adapter, SITE, students[2:], teachers[2:])
    assert alone is not None
    torch.testing.assert_close(distillation_direction(adapter, SITE, students, mismatched), alone)
    assert distillation_direction(adapter, SITE, students[:2], mismatched[:2]) is None

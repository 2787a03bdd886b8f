"""Integration (demo model): SteerX vectors raise a user's *own* planted markers on held-out
prompts more than the all-history baseline does and more than other users' SteerX vectors do."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from steerx_lens.attribution import token_texts
from steerx_lens.data import HistoryItem, make_synthetic_users
from steerx_lens.evaluation.metrics import encode_for_eval, token_nll
from steerx_lens.models import load_demo_model
from steerx_lens.pipeline import FitResult, SteerX, SteerXConfig
from steerx_lens.vectors import SteeringVector

pytestmark = pytest.mark.demo


def marker_mask(tokenizer: Any, item: HistoryItem) -> torch.Tensor:
    """Response tokens overlapping the item's planted marker spans (character ranges)."""
    text = encode_for_eval(tokenizer, item)
    pieces = token_texts(tokenizer, text.input_ids[text.response_start :])
    assert "".join(pieces).strip() == item.output.strip()
    offset = len("".join(pieces)) - len("".join(pieces).lstrip())
    mask, position = [], -offset
    for piece in pieces:
        start, stop = position, position + len(piece)
        mask.append(any(start < s["end"] and stop > s["start"] for s in item.meta["spans"]))
        position = stop
    return torch.tensor(mask)


@pytest.fixture(scope="module")
def setup() -> tuple[Any, list, FitResult]:
    model = load_demo_model("hf")
    users = make_synthetic_users(n_users=4, n_history=6, n_heldout=2, seed=0)
    return model, users, SteerX(model, SteerXConfig(layer=12), progress=False).fit_many(users)


def marker_nll(model: Any, items: list[HistoryItem], vector: SteeringVector | None) -> float:
    tokenizer = SteerX(model, progress=False).adapter.tokenizer
    texts = [encode_for_eval(tokenizer, item) for item in items]
    nlls = token_nll(model, texts, [vector] * len(texts))
    masks = [marker_mask(tokenizer, item) for item in items]
    return float(torch.cat([n[m] for n, m in zip(nlls, masks, strict=True)]).mean())


def test_own_steerx_vector_raises_own_markers_most(setup: tuple[Any, list, FitResult]) -> None:
    model, users, fit = setup
    gains = {"steerx": [], "baseline": [], "steerx_other": []}
    for user in users:
        none = marker_nll(model, user.heldout, None)
        mine = fit.users[user.user_id]
        gains["steerx"].append(none - marker_nll(model, user.heldout, mine.steerx))
        gains["baseline"].append(none - marker_nll(model, user.heldout, mine.baseline))
        others = [f.steerx for uid, f in fit.users.items() if uid != user.user_id]
        gains["steerx_other"].append(
            none - sum(marker_nll(model, user.heldout, v) for v in others) / len(others)
        )
    means = {k: sum(v) / len(v) for k, v in gains.items()}
    print("log-prob gain on planted markers (nats/token):", means, gains)
    assert means["steerx"] > means["baseline"]
    assert means["steerx"] > means["steerx_other"]

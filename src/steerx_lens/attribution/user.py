"""SteerX stages 1-2 for one user: token effects, then ranked spans."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steerx_lens.attribution.config import DEFAULT_CONFIG, AttributionConfig
from steerx_lens.attribution.effects import TokenEffects, token_effects
from steerx_lens.attribution.spans import Span, aggregate_spans
from steerx_lens.data import UserHistory


@dataclass
class UserAttribution:
    """Stage 1-2 output for one user; ``description`` is filled by stage 3 (describe)."""

    user_id: str
    items: list[TokenEffects]
    spans: list[Span]
    description: str | None = None


def attribute_user(
    model: Any,
    user: UserHistory,
    population: Sequence[UserHistory] = (),
    config: AttributionConfig = DEFAULT_CONFIG,
    *,
    tokenizer: Any = None,
) -> UserAttribution:
    """SteerX stages 1-2 for one user: :func:`token_effects`, then :func:`aggregate_spans`.

    ``population`` = other users providing counterfactual contexts (the user itself is skipped).
    """
    items = token_effects(model, user, population, config, tokenizer=tokenizer)
    return UserAttribution(user.user_id, items, aggregate_spans(items, config))

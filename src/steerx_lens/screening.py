"""Which of a user's items the pipeline can use: one bad item never fails a run.

An item is **skipped**, with a warning that names the user and the item's index, when

- it cannot be encoded (an empty response, or a tokenizer that merges the prompt into the
  response);
- its prompt (without history) leaves no room for the response within ``max_context_tokens``,
  the attribution window;
- prompt ⊕ response has more tokens than the model's context, or the prompt and the tokens
  generated after it do (the model's answers ŷ for history items, the evaluation's
  generations for held-out ones; held-out items also with the history block of the
  ``history_prompt`` method).

Every item skipped here would have stopped the run before (or failed its user). Nothing is cut:
responses longer than ``max_context_tokens`` are truncated by attribution as before
(:func:`steerx_lens.attribution.sequences.prepare_items`) and used whole elsewhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from steerx_lens.data import HistoryItem, UserHistory
from steerx_lens.pipeline import SteerX
from steerx_lens.text import encode_item


@dataclass(frozen=True)
class ItemLimits:
    """What an item must fit: the model's context (``None``: no limit), the attribution
    window (``max_context_tokens``) and the tokens generated after its prompt."""

    context: int | None
    window: int
    new_tokens: int = 0

    def problem(
        self, tokenizer: Any, item: HistoryItem, history: Sequence[HistoryItem] = ()
    ) -> str | None:
        """Why ``item`` (with ``history`` as its history block) cannot be used, or None."""
        try:
            encoded = encode_item(tokenizer, item, history)
        except ValueError as error:
            return str(error)
        n_prompt, n_total = encoded.response_start, len(encoded.input_ids)
        if not history and n_prompt >= self.window:
            return (
                f"its prompt has {n_prompt} tokens, no room for the response within "
                f"max_context_tokens={self.window}"
            )
        if self.context is not None and n_total > self.context:
            return f"it has {n_total} tokens, more than the model's context ({self.context})"
        if self.context is not None and n_prompt + self.new_tokens > self.context:
            return (
                f"its prompt ({n_prompt} tokens) and {self.new_tokens} generated tokens exceed "
                f"the model's context ({self.context})"
            )
        return None


def screen_items(
    tokenizer: Any,
    user_id: str,
    items: Sequence[HistoryItem],
    kind: str,
    limits: ItemLimits,
    histories: Sequence[Sequence[HistoryItem]] = ((),),
) -> tuple[list[HistoryItem], list[str]]:
    """The items usable with every block of ``histories``, and one message per skipped item
    (``"user 'u' history item 3 skipped: ..."``, also issued as a warning)."""
    kept: list[HistoryItem] = []
    skipped: list[str] = []
    for index, item in enumerate(items):
        problem = next(
            (p for block in histories if (p := limits.problem(tokenizer, item, block))), None
        )
        if problem is None:
            kept.append(item)
            continue
        skipped.append(f"user {user_id!r} {kind} {index} skipped: {problem}")
        warnings.warn(skipped[-1], stacklevel=3)
    return kept, skipped


def history_limits(pipeline: SteerX) -> ItemLimits:
    """The limits of history items: ŷ is generated after each prompt unless
    ``negatives="neutral"``."""
    config = pipeline.config
    answers = config.answer_tokens if config.negatives == "model" else 0
    return ItemLimits(pipeline.adapter.max_positions, config.max_context_tokens, answers)


def screen_history(pipeline: SteerX, user: UserHistory) -> tuple[UserHistory, list[str]]:
    """``user`` with only the history items the pipeline can use, and why the others were not."""
    kept, skipped = screen_items(
        pipeline.adapter.tokenizer,
        user.user_id,
        user.history,
        "history item",
        history_limits(pipeline),
    )
    return replace(user, history=kept), skipped

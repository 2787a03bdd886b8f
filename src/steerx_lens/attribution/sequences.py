"""Token layout of attribution: leave-one-out item sequences and counterfactual history blocks.

Each history item is one sequence ``[prompt head | history block | prompt rest | response]``
(:func:`steerx_lens.text.encode_item`) whose history block is the user's *other* items; the
block's positions (the *context positions*) are what a counterfactual replaces while every other
position stays aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steerx_lens.attribution.config import DEFAULT_MAX_CONTEXT_TOKENS, Counterfactual
from steerx_lens.data import HistoryItem, UserHistory
from steerx_lens.text import EncodedText, encode, encode_item, history_block

FILLER_TEXTS: tuple[str, ...] = (" ", "\n")
"""Candidates for the neutral filler token that pads a short counterfactual block (the first
one that is a single token is used); it goes *before* the block, so the block's end stays next
to the prompt text that follows it."""
NEUTRAL_ITEM = "A previous text by this user."
"""``counterfactual="neutral"``: this item, in the history-block format, repeated to length."""
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True, kw_only=True)
class ItemSequence(EncodedText):
    """One history item of ``user_id`` as an :class:`~steerx_lens.text.EncodedText`.

    ``n_dropped`` oldest other items were left out of the block to fit the budget;
    ``truncated`` says the response was cut to fit.
    """

    user_id: str
    item_index: int
    n_dropped: int = 0
    truncated: bool = False


def prepare_items(
    tokenizer: Any,
    user: UserHistory,
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
    targets: Sequence[HistoryItem] | None = None,
) -> list[ItemSequence]:
    """Leave-one-out sequences for every history item of ``user``, fit to the token budget.

    With ``targets`` (e.g. held-out items), each target is scored with the user's *whole*
    history as context instead (one history item is then enough).

    The oldest other items are dropped (deterministically) until prompt + response fit in
    ``max_context_tokens``; if the item alone is too long, its response is cut. Raises
    ``ValueError`` for an empty history, a single item (leave-one-out has no context: every
    effect would be 0), or a prompt that alone fills the budget.
    """
    if not user.history:
        raise ValueError(f"user {user.user_id!r} has an empty history: nothing to attribute")
    if targets is None and len(user.history) < 2:
        raise ValueError(
            f"user {user.user_id!r} has 1 history item: leave-one-out attribution needs at least "
            "2 (the other items form the preference context; with none every effect is 0)"
        )
    sequences = []
    scored = user.history if targets is None else targets
    for index, item in enumerate(scored):
        others = (
            user.history[:index] + user.history[index + 1 :] if targets is None else user.history
        )

        def fits(n_dropped: int, item: HistoryItem = item, others: list = others) -> bool:
            encoded = encode_item(tokenizer, item, others[n_dropped:])
            return len(encoded.input_ids) <= max_context_tokens

        low, high = 0, len(others)  # smallest n_dropped that fits (binary search), else all
        while low < high:
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle + 1
        encoded = encode_item(tokenizer, item, others[low:])
        ids, response_start = encoded.input_ids, encoded.response_start
        truncated = len(ids) > max_context_tokens
        if truncated:
            if response_start >= max_context_tokens:
                raise ValueError(
                    f"user {user.user_id!r} item {index}: the prompt alone has {response_start} "
                    f"tokens, max_context_tokens={max_context_tokens} leaves no room for the "
                    "response"
                )
            ids = ids[:max_context_tokens]
        sequences.append(
            ItemSequence(
                input_ids=ids,
                response_start=response_start,
                context_start=encoded.context_start,
                context_stop=encoded.context_stop,
                user_id=user.user_id,
                item_index=index,
                n_dropped=low,
                truncated=truncated,
            )
        )
    return sequences


def filler_token(tokenizer: Any) -> int:
    """The neutral padding token of counterfactual blocks (first of :data:`FILLER_TEXTS`)."""
    for text in FILLER_TEXTS:
        ids = encode(tokenizer, text)
        if len(ids) == 1:
            return ids[0]
    raise ValueError(f"the tokenizer encodes none of {FILLER_TEXTS!r} as a single token")


def _fit_length(ids: Sequence[int], length: int, filler: int) -> list[int]:
    """Keep the last ``length`` tokens, or left-pad with ``filler`` up to ``length``."""
    if length == 0:
        return []
    kept = list(ids[-length:])
    return [filler] * (length - len(kept)) + kept


def counterfactual_contexts(
    tokenizer: Any,
    length: int,
    counterfactual: Counterfactual,
    sources: Sequence[UserHistory] = (),
) -> list[list[int]]:
    """Counterfactual history blocks of exactly ``length`` tokens.

    ``"other_users"``/``"mean"``: one per user in ``sources`` (their history block, most recent
    items kept, left-padded with :func:`filler_token`); ``"neutral"``: one block of
    :data:`NEUTRAL_ITEM` lines.
    """
    filler = filler_token(tokenizer)
    if counterfactual == "neutral":
        line = encode(tokenizer, history_block([HistoryItem("", NEUTRAL_ITEM)]))
        newline = encode(tokenizer, "\n")
        repeats = length // max(len(line), 1) + 1
        ids = (line + newline) * repeats
        return [_fit_length(ids[: len(ids) - len(newline)], length, filler)]
    return [
        _fit_length(encode(tokenizer, history_block(other.history)), length, filler)
        for other in sources
    ]


def no_history_sequence(tokenizer: Any, item: HistoryItem, seq: ItemSequence) -> EncodedText:
    """``method="prompt"``: the same item without the history block, same response tokens."""
    encoded = encode_item(tokenizer, item)
    response = encoded.response_ids[: len(seq.response_ids)]
    if response != seq.response_ids:
        raise ValueError(
            f"user {seq.user_id!r} item {seq.item_index}: the response tokenizes differently "
            "with and without the history block, so method='prompt' cannot compare them"
        )
    return EncodedText(
        encoded.input_ids[: encoded.response_start] + response, encoded.response_start
    )


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Display text of each token; they concatenate to the decoded sequence.

    A character split over several byte-level tokens (e.g. an emoji) is given to its *first*
    token (where the causal effect sits); the continuation tokens get ``""``.
    """
    texts: list[str] = []
    stable = ""
    pending: int | None = None  # first token of a character still incomplete
    for i in range(len(ids)):
        decoded = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False)
        complete = decoded.rstrip(_REPLACEMENT)
        if not complete.startswith(stable):  # decoding is not prefix-stable here
            complete = stable + tokenizer.decode([ids[i]], skip_special_tokens=False)
        new = complete[len(stable) :]
        stable = complete
        if pending is not None and new:
            texts[pending] += new[0]
            new = new[1:]
            pending = None
        texts.append(new)
        if decoded != complete and pending is None:
            pending = i
    return texts

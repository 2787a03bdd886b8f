"""Text ↔ tokens: the one owner of prompt building, chat formatting, encoding and padding.

Prompts: an item's ``input`` becomes the user message (with the user's history block in front
of it when a history is given, :func:`format_user_message`), which is wrapped in the
tokenizer's chat template (:func:`chat_prompt`) or, for tokenizers without one, in
:data:`PLAIN_PROMPT_TEMPLATE` (:func:`build_prompt`). The response follows the prompt
(:func:`prompt_and_response`).

Encoding: :func:`encode_item` tokenizes ``[prompt head | history block | prompt rest |
response]`` so that the block occupies whole tokens; the result is an :class:`EncodedText`
(token ids, where the block and the response sit). :func:`pad_batch` left-pads any number of
them into one batch for :mod:`steerx_lens.hooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from steerx_lens.data.schema import HistoryItem

PLAIN_PROMPT_TEMPLATE = "Question: {input}\nAnswer:"
"""Prompt format for tokenizers without a chat template."""
PLAIN_SYSTEM_TEMPLATE = "{system}\n\n"
"""Prefix for a system text in the plain format."""
PLAIN_RESPONSE_SEPARATOR = " "
"""Put between a plain prompt and the response ("Answer: text"); chat prompts need none."""
HISTORY_TEMPLATE = "Here are previous texts by this user:\n{history}\n\nNow respond to: {input}"
"""The user message when a history is given (the history block comes first)."""
HISTORY_ITEM_TEMPLATE = "- {output}"
"""One history item in the block: its output, with whitespace runs collapsed to one space."""


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def history_block(items: Sequence[HistoryItem]) -> str:
    """The history block: one :data:`HISTORY_ITEM_TEMPLATE` line per item."""
    return "\n".join(
        HISTORY_ITEM_TEMPLATE.format(output=" ".join(item.output.split())) for item in items
    )


def recent_items(tokenizer: Any, items: Sequence[HistoryItem], budget: int) -> list[HistoryItem]:
    """The most recent ``items`` (oldest first) whose :func:`history_block` fits ``budget``
    tokens (counted without special tokens: the block sits inside a prompt)."""
    chosen: list[HistoryItem] = []
    for item in reversed(items):
        block = [item, *chosen]
        if len(tokenizer(history_block(block), add_special_tokens=False)["input_ids"]) > budget:
            break
        chosen = block
    return chosen


def format_user_message(item_input: str, history: Sequence[HistoryItem] | None = None) -> str:
    """The user-message text: ``item_input`` alone, or :data:`HISTORY_TEMPLATE` with a history."""
    if not history:
        return item_input
    return HISTORY_TEMPLATE.format(history=history_block(history), input=item_input)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether prompts for ``tokenizer`` go through its chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: Any, message: str, system: str | None = None) -> str:
    """``message`` as a user turn (after an optional system turn) with the generation prompt.

    The one chat wrapper of the library. A tokenizer without a chat template gets ``message``
    unchanged (:func:`build_prompt` adds the plain format instead).
    """
    if not has_chat_template(tokenizer):
        return message
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": message})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompt(
    tokenizer: Any,
    item_input: str,
    history: Sequence[HistoryItem] | None = None,
    system: str | None = None,
) -> str:
    """The prompt text for ``item_input`` (optionally with the user's history in it).

    With a chat template: :func:`chat_prompt` (the template may add its own default system
    message). Without one: :data:`PLAIN_SYSTEM_TEMPLATE` (if ``system``) +
    :data:`PLAIN_PROMPT_TEMPLATE`.
    """
    message = format_user_message(item_input, history)
    if has_chat_template(tokenizer):
        return chat_prompt(tokenizer, message, system)
    prefix = PLAIN_SYSTEM_TEMPLATE.format(system=system) if system else ""
    return prefix + PLAIN_PROMPT_TEMPLATE.format(input=message)


def prompt_and_response(
    tokenizer: Any,
    item: HistoryItem,
    history: Sequence[HistoryItem] | None = None,
    system: str | None = None,
) -> tuple[str, str]:
    """(prompt, prompt + response) for one item; no EOS is appended.

    The response follows the prompt directly (chat) or after :data:`PLAIN_RESPONSE_SEPARATOR`
    (plain), so the prompt's tokens are a prefix of the full text's tokens and the response
    tokens start at ``len(tokenize(prompt))``.
    """
    prompt = build_prompt(tokenizer, item.input, history, system)
    separator = "" if has_chat_template(tokenizer) else PLAIN_RESPONSE_SEPARATOR
    return prompt, prompt + separator + item.output


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedText:
    """Token ids of prompt ⊕ response: the response starts at ``response_start``.

    ``context_start:context_stop`` are the history block's positions inside the prompt (empty
    when there is no block): the positions that attribution swaps or patches.
    ``pooled_positions``, where set, are the positions a pooled read
    (:func:`~steerx_lens.backbones.mean_diff.pooled_activations`, ``response_mean``) averages
    instead of the response (e.g. the positions that predict the preference-driven tokens).
    """

    input_ids: list[int]
    response_start: int
    context_start: int = 0
    context_stop: int = 0
    pooled_positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.response_start < len(self.input_ids):
            raise ValueError(
                f"a sequence needs a non-empty prompt and response (response_start="
                f"{self.response_start}, length {len(self.input_ids)})"
            )
        if self.pooled_positions is not None and (
            not self.pooled_positions
            or not all(0 <= p < len(self.input_ids) for p in self.pooled_positions)
        ):
            raise ValueError(
                f"pooled_positions must be a non-empty set of positions in 0..{len(self.input_ids) - 1}"
                f", got {self.pooled_positions}"
            )

    @property
    def context_len(self) -> int:
        """Number of history-block (context) positions."""
        return self.context_stop - self.context_start

    @property
    def response_ids(self) -> list[int]:
        """Token ids of the response."""
        return self.input_ids[self.response_start :]

    def with_response(self, response_ids: Sequence[int]) -> EncodedText:
        """The same prompt with another response (e.g. the swapped twin of a minimal pair)."""
        return replace(self, input_ids=self.input_ids[: self.response_start] + list(response_ids))

    def with_context(self, context_ids: Sequence[int]) -> EncodedText:
        """The same sequence with the history block replaced by ``context_ids`` (same length)."""
        if len(context_ids) != self.context_len:
            raise ValueError(
                f"a counterfactual context must have {self.context_len} tokens, got "
                f"{len(context_ids)}"
            )
        ids = self.input_ids
        return replace(
            self, input_ids=ids[: self.context_start] + list(context_ids) + ids[self.context_stop :]
        )


def encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    """Token ids of ``text``; ``special`` adds the tokenizer's special tokens (e.g. BOS)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_item(
    tokenizer: Any,
    item: HistoryItem,
    history: Sequence[HistoryItem] = (),
    system: str | None = None,
) -> EncodedText:
    """``item``'s prompt (with ``history`` as the history block, after an optional ``system``
    text) ⊕ its output, as token ids.

    The prompt is tokenized in three pieces (head, block, rest) so that the block occupies
    whole tokens. Response tokens are found by tokenizing the prompt's rest with and without the
    response; the first must be a prefix of the second.
    """
    prompt, full = prompt_and_response(tokenizer, item, list(history) or None, system)
    response_text = full[len(prompt) :]
    # Chat-template text already carries its special tokens; plain prompts get the tokenizer's.
    special = not has_chat_template(tokenizer)
    if history:
        block = history_block(history)
        start = prompt.find(format_user_message(item.input, history))
        start = prompt.find(block, max(start, 0))
        if start < 0:
            raise ValueError(
                "cannot locate the history block in the prompt built by build_prompt; the chat "
                "template rewrote the user message"
            )
        head = encode(tokenizer, prompt[:start], special)
        block_ids = encode(tokenizer, block)
        rest_text, rest_special = prompt[start + len(block) :], False
    else:
        head, block_ids, rest_text, rest_special = [], [], prompt, special
    rest = encode(tokenizer, rest_text, rest_special)
    rest_full = encode(tokenizer, rest_text + response_text, rest_special)
    if rest_full[: len(rest)] != rest:
        raise ValueError(
            f"the prompt's tokens are not a prefix of prompt + response's tokens (the tokenizer "
            f"merges across the boundary at {rest_text[-20:]!r} + {response_text[:20]!r}); "
            "response tokens cannot be located"
        )
    if len(rest_full) == len(rest):
        raise ValueError("the item's response is empty: there are no tokens to attribute")
    stop = len(head) + len(block_ids)
    return EncodedText(head + block_ids + rest_full, stop + len(rest), len(head), stop)


def response_offsets(
    tokenizer: Any, text: EncodedText, output: str
) -> Int[Tensor, "n_response 2"] | None:
    """The ``[start, end)`` characters of ``output`` covered by each response token of ``text``
    (the item's output encoded after its prompt), or None when the tokens cannot be aligned.

    Uses the tokenizer's ``offset_mapping`` when the output tokenized alone gives the same ids,
    else the lengths of cumulative decodes (e.g. a plain prompt's separator merged into the
    first token).
    """
    ids = text.response_ids
    try:
        alone = tokenizer(output, add_special_tokens=False, return_offsets_mapping=True)
        if list(alone["input_ids"]) == ids:
            return torch.tensor(alone["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    except (NotImplementedError, TypeError, ValueError, KeyError):
        pass  # a slow tokenizer without offsets: decode below
    decoded = tokenizer.decode(ids)
    if not decoded.endswith(output):
        return None
    shift = len(decoded) - len(output)
    ends = [len(tokenizer.decode(ids[: i + 1])) - shift for i in range(len(ids))]
    starts = [-shift, *ends[:-1]]
    spans = [(max(a, 0), max(b, 0)) for a, b in zip(starts, ends, strict=True)]
    return torch.tensor(spans, dtype=torch.long).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------------


class PaddedBatch(NamedTuple):
    """Left-padded texts: the model inputs and where each row's response and context sit."""

    inputs: dict[str, Int[Tensor, "batch pos"]]
    response: Bool[Tensor, "batch pos"]
    context: Bool[Tensor, "batch pos"]


def pad_batch(texts: Sequence[EncodedText], pad_id: int) -> PaddedBatch:
    """Left-pad ``texts`` to one ``{"input_ids", "attention_mask"}`` batch, with their masks."""
    width = max(len(text.input_ids) for text in texts)
    ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    response = torch.zeros((len(texts), width), dtype=torch.bool)
    context = torch.zeros((len(texts), width), dtype=torch.bool)
    for row, text in enumerate(texts):
        offset = width - len(text.input_ids)
        ids[row, offset:] = torch.tensor(text.input_ids)
        mask[row, offset:] = 1
        response[row, offset + text.response_start :] = True
        context[row, offset + text.context_start : offset + text.context_stop] = True
    return PaddedBatch({"input_ids": ids, "attention_mask": mask}, response, context)

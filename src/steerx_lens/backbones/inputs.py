"""What backbones accept as texts, and the one function that normalises it.

Every backbone (and :func:`~steerx_lens.backbones.mean_diff.mean_diff_vector`,
:func:`~steerx_lens.backbones.mean_diff.pooled_activations`,
:func:`~steerx_lens.backbones.mean_diff.residual_norm`) reads each text as one of
(:data:`~steerx_lens.backbones.base.SampleLike`):

- ``str``: a whole text, tokenized as :func:`steerx_lens.hooks.run` reads it (the tokenizer's
  own special tokens, no chat template). Every token after the first is the response; the first
  token only conditions the rest (it is BOS where the tokenizer adds one; otherwise it has no
  context and its activation is the attention sink, so it is left out of pooled means);
- ``(prompt, response)``: a tuple of two strings, exactly ``HistoryItem(prompt, response)``;
- :class:`~steerx_lens.data.HistoryItem`: the prompt built by
  :func:`~steerx_lens.text.build_prompt` (chat template where the model has one) ⊕ the output;
- :class:`~steerx_lens.backbones.base.Sample`: as before (pinned tokens where set);
- :class:`~steerx_lens.text.EncodedText`: token ids used as given.

Anything else raises :class:`~steerx_lens.errors.InputTypeError` naming what to pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steerx_lens.backbones.base import Sample, SampleLike
from steerx_lens.data import HistoryItem
from steerx_lens.errors import InputTypeError
from steerx_lens.text import EncodedText, encode

ACCEPTED = (
    "a str (a whole text), a (prompt, response) tuple of two strings, a HistoryItem, a "
    "backbones.Sample or a text.EncodedText"
)


def encode_text(tokenizer: Any, text: str) -> EncodedText:
    """A whole text as token ids (as ``hooks.run`` tokenizes it); the response is every token
    after the first."""
    ids = encode(tokenizer, text, special=True)
    if len(ids) < 2:
        raise ValueError(
            f"the text {text[:40]!r} has {len(ids)} token(s): a whole text needs at least two "
            "(the first conditions the rest); pass a longer text or a (prompt, response) tuple"
        )
    return EncodedText(ids, response_start=1)


def _decoded(tokenizer: Any, tokens: EncodedText) -> HistoryItem:
    """The text of token ids, split at the response (for backbones that show it)."""
    ids = tokens.input_ids
    return HistoryItem(
        input=tokenizer.decode(ids[: tokens.response_start]),
        output=tokenizer.decode(ids[tokens.response_start :]),
    )


def as_sample(tokenizer: Any, text: object, where: str = "text") -> Sample:
    """One text of any accepted kind as a :class:`Sample`; ``where`` names it in errors."""
    if isinstance(text, Sample):
        return text
    if isinstance(text, HistoryItem):
        return Sample(text)
    if isinstance(text, str):
        return Sample(HistoryItem(input="", output=text), encode_text(tokenizer, text), True)
    if isinstance(text, EncodedText):
        return Sample(_decoded(tokenizer, text), text, True)
    if isinstance(text, tuple):
        if len(text) == 2 and all(isinstance(part, str) for part in text):
            return Sample(HistoryItem(input=text[0], output=text[1]))
        kinds = ", ".join(type(part).__name__ for part in text)
        raise InputTypeError(
            f"{where} is a tuple of ({kinds}): a tuple must be (prompt, response), two "
            f"strings; or pass {ACCEPTED}"
        )
    raise InputTypeError(f"{where} is a {type(text).__name__}: pass {ACCEPTED}")


def _listed(texts: object, what: str) -> list[object]:
    """``texts`` as a list: one text alone (a str, item, sample or token ids) is a list of one."""
    if isinstance(texts, (str, HistoryItem, Sample, EncodedText)):
        return [texts]
    if not isinstance(texts, Sequence):
        raise InputTypeError(
            f"{what} is a {type(texts).__name__}: pass a list of texts, each {ACCEPTED}"
        )
    return list(texts)


def as_samples(
    tokenizer: Any, texts: Sequence[SampleLike] | SampleLike, what: str = "texts"
) -> list[Sample]:
    """Every text of ``texts`` as a :class:`Sample` (:func:`as_sample`); ``what`` names the
    argument in errors (``"chosen[3] is a dict: pass ..."``)."""
    return [
        as_sample(tokenizer, text, f"{what}[{index}]")
        for index, text in enumerate(_listed(texts, what))
    ]


def as_encoded(
    tokenizer: Any, texts: Sequence[SampleLike] | SampleLike, what: str = "texts"
) -> list[EncodedText]:
    """Every text of ``texts`` as token ids: :class:`EncodedText` as given, samples by
    :meth:`Sample.encoded`, the other kinds through :func:`as_sample`."""
    out = []
    for index, text in enumerate(_listed(texts, what)):
        if isinstance(text, EncodedText):
            out.append(text)
        else:
            out.append(as_sample(tokenizer, text, f"{what}[{index}]").encoded(tokenizer))
    return out

"""What a backbone reads and what it is: :class:`Sample` and the :class:`Backbone` protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union

from jaxtyping import Float
from torch import Tensor

from steerx_lens.data import HistoryItem
from steerx_lens.text import EncodedText, encode_item


@dataclass(frozen=True)
class Sample:
    """One prompt ⊕ response: the text (``item``) and, where pinned, its exact tokens.

    Backbones that score text build the prompt from ``item.input`` with
    :func:`steerx_lens.text.build_prompt`; backbones that read activations use
    :meth:`encoded`. ``tokens`` is pinned in minimal pairs: a twin's tokens are its original's
    with the preference-driven ones swapped (same length); its ``item.output`` is their decoded
    text, whose re-encoding could differ. Backbones also take plain strings, ``(prompt,
    response)`` tuples, history items and :class:`~steerx_lens.text.EncodedText` s, made into
    samples by :func:`~steerx_lens.backbones.inputs.as_samples`.
    """

    item: HistoryItem
    tokens: EncodedText | None = None
    exact_tokens: bool = False
    """True for samples given as tokens or as a whole text (see
    :func:`~steerx_lens.backbones.inputs.as_samples`): every backbone reads ``tokens`` as given
    (``"bipo"`` and ``"sae"`` included, which otherwise re-encode ``item`` from its text)."""

    def encoded(self, tokenizer: Any) -> EncodedText:
        """``tokens`` if pinned, else the plain prompt (no history) ⊕ output as token ids."""
        return self.tokens if self.tokens is not None else encode_item(tokenizer, self.item)


SampleLike = Union[str, tuple[str, str], HistoryItem, Sample, EncodedText]
"""What backbones read as one text: a whole text (``str``, every token after the first is
the response), a ``(prompt, response)`` tuple (as ``HistoryItem(prompt, response)``), a
:class:`~steerx_lens.data.HistoryItem`, a :class:`Sample` or a
:class:`~steerx_lens.text.EncodedText` (token ids used as given)."""


class Backbone(Protocol):
    """A steering method: paired chosen / rejected samples at one site → one vector.

    ``chosen[i]`` and ``rejected[i]`` answer the same prompt (a user's text and the model's
    answer, or a text and its minimal-pair twin). ``options`` are the pipeline's backbone
    options (``pool``, ``batch_size``, ``steps``, ``seed``, ``sae``, ``sae_k``, see
    :meth:`steerx_lens.pipeline.SteerX.backbone_options`): a backbone takes the ones it uses and
    ignores the rest, so any registered backbone runs from the same call.
    """

    def __call__(
        self,
        model: Any,
        site: str,
        chosen: Sequence[SampleLike],
        rejected: Sequence[SampleLike],
        **options: Any,
    ) -> Float[Tensor, " d_model"]: ...

"""SteerX stages 1-2: causal token effects of a user's preference context, selection, spans.

For a user u with history items (x_i, y_i) and each token t of y_i::

    CE_{i,t} = log p(y_t | x_i, do(h_u), y_<t) - log p(y_t | x_i, do(h_0), y_<t)

(or ``p1 - p2`` with ``measure="prob"``). ``h_u`` is the user's *other* history items
(leave-one-out), put in the prompt as a history block with :func:`steerx_lens.text.build_prompt`.

What is a reconstruction: the SteerX paper's body was not available, so the estimator's form
(a log-probability or probability difference with and without the user's context, per response
token, thresholded) follows NextQuill (arXiv 2506.02368), whose ``do(h_0)`` deletes the history
from the prompt (``method="prompt"`` here). The default ``do(h_0)`` of this library -- patching
*other users'* same-length history blocks into the context positions (``method="patch"``,
``counterfactual="other_users"``) -- and the selection/span rules are this library's choices,
made from the measurements in DESIGN.md §1 (other users' contexts cancel what all users share:
sign-off tokens ≈ +12 nats, other tokens ≈ 0 ± 0.3; deleting the history also credits generic
format tokens).

Modules, bottom up: :mod:`~steerx_lens.attribution.config` (:class:`AttributionConfig`, every
option and default), :mod:`~steerx_lens.attribution.sequences` (the token layout ``[prompt head
| history block | prompt rest | response]`` and the counterfactual blocks),
:mod:`~steerx_lens.attribution.scoring` (left-padded batched forward passes through
:mod:`steerx_lens.hooks`, so any backend works), :mod:`~steerx_lens.attribution.effects`
(:func:`token_effects`, :func:`layer_effects`), :mod:`~steerx_lens.attribution.spans` (the pure
helpers :func:`select_tokens`, :func:`merge_spans`, :func:`aggregate_spans`) and
:mod:`~steerx_lens.attribution.user` (:func:`attribute_user`: effects + ranked spans).
"""

from steerx_lens.attribution.config import (
    COUNTERFACTUALS,
    DEFAULT_CONFIG,
    DEFAULT_SITES,
    DEFAULT_THRESHOLDS,
    MEASURES,
    METHODS,
    RULES,
    STOPWORDS,
    AttributionConfig,
    Counterfactual,
    Measure,
    Method,
    Rule,
)
from steerx_lens.attribution.effects import LayerEffects, TokenEffects, layer_effects, token_effects
from steerx_lens.attribution.sequences import (
    ItemSequence,
    counterfactual_contexts,
    prepare_items,
    token_texts,
)
from steerx_lens.attribution.spans import (
    Span,
    aggregate_spans,
    merge_spans,
    select_tokens,
    span_key,
)
from steerx_lens.attribution.user import UserAttribution, attribute_user

__all__ = [
    "COUNTERFACTUALS",
    "DEFAULT_CONFIG",
    "DEFAULT_SITES",
    "DEFAULT_THRESHOLDS",
    "MEASURES",
    "METHODS",
    "RULES",
    "STOPWORDS",
    "AttributionConfig",
    "Counterfactual",
    "ItemSequence",
    "LayerEffects",
    "Measure",
    "Method",
    "Rule",
    "Span",
    "TokenEffects",
    "UserAttribution",
    "aggregate_spans",
    "attribute_user",
    "counterfactual_contexts",
    "layer_effects",
    "merge_spans",
    "prepare_items",
    "select_tokens",
    "span_key",
    "token_effects",
    "token_texts",
]

"""How SteerX builds a user's *personal* direction: constructions as plain callables.

A construction returns the raw personal component at a site (or None when the user has no
evidence for it); the pipeline normalises it to the unit direction v̂ and adds ``r·‖h‖·v̂`` to
the user's leave-one-out shared vector (:func:`steerx_lens.pipeline.steerx_combination`).
Registered in :data:`CONSTRUCTIONS`; every construction here is this library's
reconstruction (the paper's abstract states only that token-level causal effects select the
preference-driven tokens, that these become a description, and that the description steers):

- ``"minimal_pairs"``: the user's texts vs their counterfactual twins, in which the tokens with
  patch-CE above ``swap_threshold`` are replaced by the model's prediction under other users'
  context (:func:`steerx_lens.evidence.minimal_pairs`); only the preference-driven tokens
  separate the two sides;
- ``"description_contrast"``: the user's own texts read with the user's *description* in the
  prompt (system text) vs without it, pooled over the response: the description's effect on
  the model's reading of the user's text (two different descriptions give two different
  vectors);
- ``"description_content"``: as ``description_contrast``, but against the same instruction
  without the description (``Write as this user writes.``) rather than against the model's
  default prompt: only what the description's *content* does (the instruction's generic shift
  cancels);
- ``"history_contrast"``: the user's texts read with the user's own other fit items in the
  prompt vs with a counterfactual user's items (drawn as in attribution), pooled over the
  response: an in-context vector of what the user's history does;
- ``"history_description"``: the mean of the two unit directions above (the reading "½ (with
  history − without) + ½ (with description − without)");
- ``"description_pairs"``: for each fit prompt, the model's greedy answer written with the
  description in the prompt (chosen) vs its plain answer ŷ (rejected), both read without the
  description: StyleVector/BiPO pairs whose only difference is what the description does to
  the model's own writing. Any backbone;
- ``"description_at_effects"`` / ``"history_at_effects"``: ``description_contrast`` /
  ``history_contrast`` read only at the positions that predict the preference-driven tokens
  (patch-CE above ``swap_threshold``), where the causal effects say the preference acts;
- ``"description_specific"``: the user's texts with *their* description vs with other users'
  descriptions (:attr:`~steerx_lens.pipeline.Population.descriptions`), at those positions:
  what this description does that others do not; ``"description_contrast_specific"`` adds
  half of it to the unit ``description_contrast`` direction; ``"description_blend"`` is the
  mean of the unit ``description_contrast`` and ``description_at_effects`` directions;
- output-space directions (:mod:`steerx_lens.distill`: the negative gradient, at ``v = 0``, of
  a cross-entropy between the steered model's predictions on the user's own texts and a
  target): ``"description_distill"`` (target: the model's predictions with the description in
  the prompt, i.e. first-order context distillation of the description into one vector),
  ``"description_distill_specific"`` (the user's description's predictions minus the
  counterfactual users' descriptions'), ``"history_distill"`` (the predictions after the
  user's other fit items), ``"likelihood_gradient"`` (the texts' own tokens: the direction
  that most raises their likelihood), ``"preference_gradient"`` (only the preference-driven
  tokens, patch-CE above ``swap_threshold``), and the means of unit directions
  ``"preference_description"`` (preference_gradient + description_distill) and
  ``"likelihood_description"`` (likelihood_gradient + description_distill). They use the
  model's gradient, not the backbone, so every backbone supports them.

Which of them helps on validation items is measured in ``docs/method.md``; the default is
``likelihood_description`` for every backbone (on a remote model, which gives no gradients,
``description_contrast`` for the activation backbones and ``minimal_pairs`` for ``bipo``).

Contrast constructions compare the *same response* under two prompts, which only activation
backbones can read: they need a backbone that pools activations (``mean_diff``, and ``sae``
which projects it); ``bipo`` (which scores responses) supports ``minimal_pairs`` and
``description_pairs``, and the others raise a :class:`~steerx_lens.errors.SteerXError` naming
what to use. A user without preference-driven spans has no description (:data:`EMPTY_DESCRIPTION`)
and so no description-driven component.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from steerx_lens.attribution.effects import TokenEffects, counterfactual_users
from steerx_lens.backbones import Sample
from steerx_lens.data import HistoryItem
from steerx_lens.describe import EMPTY_DESCRIPTION
from steerx_lens.distill import Teachers, distillation_direction
from steerx_lens.errors import SteerXError
from steerx_lens.text import EncodedText, build_prompt, encode_item, recent_items

if TYPE_CHECKING:
    from steerx_lens.evidence import UserEvidence
    from steerx_lens.pipeline import Population, SteerX

Construction = Callable[["SteerX", "UserEvidence", "Population", str], Tensor | None]
DESCRIPTION_SYSTEM_TEMPLATE = "Write as this user writes. {description}"
"""The system text the description is given in (also the ``description_prompt`` control's)."""
SPECIFIC_SHARE = 0.5
"""Weight of the unit ``description_specific`` direction added to the unit
``description_contrast`` one in ``description_contrast_specific``."""
CONTEXT_BUDGET = 192
"""Tokens of history block in ``history_contrast`` prompts (the most recent items that fit)."""
ACTIVATION_BACKBONES = ("mean_diff", "sae")
TRAINED_BACKBONES = ("bipo",)
"""Backbones that train their vector through the model's gradients (not on a remote model)."""
NEEDS_GRADIENTS = (
    "description_distill",
    "description_distill_specific",
    "history_distill",
    "likelihood_gradient",
    "preference_gradient",
    "preference_description",
    "likelihood_description",
)
"""Output-space constructions: they read the model's gradient, which a remote run cannot give."""
ANY_BACKBONE = ("minimal_pairs", "description_pairs", *NEEDS_GRADIENTS)
"""Constructions that work with every backbone: they compare two *responses*, or take the
model's own gradient (the ``*_distill`` and ``likelihood_gradient`` directions)."""
DESCRIPTION_DRIVEN = (
    "description_contrast",
    "description_at_effects",
    "description_blend",
    "description_specific",
    "description_contrast_specific",
    "description_content",
    "history_description",
    "description_pairs",
    "description_distill",
    "description_distill_specific",
    "preference_description",
    "likelihood_description",
)
"""Constructions whose component depends on the user's description (the ``description_swap``
control rebuilds them from another user's description)."""
EFFECT_DRIVEN = ("preference_gradient", "preference_description")
"""Constructions fitted to the preference-driven tokens themselves: their ``random_swap``
control rebuilds them with each item's causal effects shuffled over its tokens."""


def _require_activation_backbone(pipeline: SteerX, name: str) -> None:
    check_construction(name, pipeline.config.backbone)


def evidenced_description(description: str | None) -> str | None:
    """``description``, or None when it has no evidence behind it (empty, or the describer's
    sentence for a user without spans)."""
    return None if not description or description == EMPTY_DESCRIPTION else description


def user_description(evidence: UserEvidence) -> str | None:
    """The user's description, or None when it has no evidence behind it."""
    return evidenced_description(evidence.description)


def with_description(evidence: UserEvidence, description: str | None) -> UserEvidence:
    """``evidence`` with another description (everything else, the texts included, unchanged):
    what the ``description_swap`` control builds its component from."""
    return replace(evidence, attribution=replace(evidence.attribution, description=description))


def minimal_pairs_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The backbone's vector for the user's texts vs their minimal-pair twins."""
    pairs = evidence.pairs
    if not pairs.originals:
        return None
    return pipeline.contrast(pairs.originals, pairs.twins, site)


PairEncoder = Callable[[int, HistoryItem], tuple[EncodedText, EncodedText] | None]
"""``(item index, item) -> (chosen, rejected)`` token ids of the same response under two
prompts, or None to skip the item."""


def _system_pairs(tokenizer: object, system: str, reference: str | None) -> PairEncoder:
    """Each item read with ``system`` as the system text vs with ``reference`` (None: the
    chat template's default)."""

    def encode_pair(index: int, item: HistoryItem) -> tuple[EncodedText, EncodedText]:
        return encode_item(tokenizer, item, (), system), encode_item(tokenizer, item, (), reference)

    return encode_pair


def _contrast_whole(
    pipeline: SteerX, evidence: UserEvidence, site: str, encode_pair: PairEncoder
) -> Float[Tensor, " d_model"] | None:
    """The backbone's contrast of ``encode_pair(index, item)`` over every history item (the
    same response under two prompts), pooled over the whole response."""
    chosen, rejected = [], []
    for index, item in enumerate(evidence.user.history):
        pair = encode_pair(index, item)
        if pair is not None:
            chosen.append(Sample(item, pair[0], exact_tokens=True))
            rejected.append(Sample(item, pair[1], exact_tokens=True))
    return pipeline.contrast(chosen, rejected, site) if chosen else None


def _described_vs(
    pipeline: SteerX, evidence: UserEvidence, site: str, name: str, reference: str | None
) -> Float[Tensor, " d_model"] | None:
    """The user's texts read with the description as the system text vs with ``reference``
    as the system text (None: the chat template's default)."""
    _require_activation_backbone(pipeline, name)
    description = user_description(evidence)
    if description is None:
        return None
    system = DESCRIPTION_SYSTEM_TEMPLATE.format(description=description)
    encode_pair = _system_pairs(pipeline.adapter.tokenizer, system, reference)
    return _contrast_whole(pipeline, evidence, site, encode_pair)


def description_contrast_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The user's texts with the description in the prompt vs without it."""
    return _described_vs(pipeline, evidence, site, "description_contrast", None)


def description_content_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The user's texts with the description in the prompt vs with the instruction alone."""
    instruction = DESCRIPTION_SYSTEM_TEMPLATE.format(description="").strip()
    return _described_vs(pipeline, evidence, site, "description_content", instruction)


def _history_pairs(pipeline: SteerX, evidence: UserEvidence, population: Population) -> PairEncoder:
    """Item ``index`` after the user's own other fit items vs after a counterfactual user's
    items (one drawn per item, seeded by the seed and the user's id)."""
    user, config = evidence.user, pipeline.config
    tokenizer = pipeline.adapter.tokenizer
    others = counterfactual_users(user, population.users, config.k_counterfactual, config.seed)
    rng = random.Random(f"{config.seed}:{user.user_id}:history_contrast")

    def encode_pair(index: int, item: HistoryItem) -> tuple[EncodedText, EncodedText] | None:
        rest = user.history[:index] + user.history[index + 1 :]
        mine = recent_items(tokenizer, rest, CONTEXT_BUDGET)
        theirs = recent_items(tokenizer, rng.choice(others).history, CONTEXT_BUDGET)
        if not mine or not theirs:
            return None
        return encode_item(tokenizer, item, mine), encode_item(tokenizer, item, theirs)

    return encode_pair


def history_contrast_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The user's texts after their own other fit items vs after a counterfactual user's."""
    _require_activation_backbone(pipeline, "history_contrast")
    if len(evidence.user.history) < 2:
        return None
    return _contrast_whole(pipeline, evidence, site, _history_pairs(pipeline, evidence, population))


def mean_of_units(*components: Tensor | None) -> Float[Tensor, " d_model"] | None:
    """The mean of the unit vectors of the components that exist and are non-zero (None when
    none does): two directions mixed with equal weight whatever their raw norms."""
    parts = [c / c.norm() for c in components if c is not None and float(c.norm()) > 0]
    return None if not parts else sum(parts) / len(parts)


def history_description_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The mean of the unit history and description directions (either alone if the other is
    missing)."""
    return mean_of_units(
        history_contrast_component(pipeline, evidence, population, site),
        description_contrast_component(pipeline, evidence, population, site),
    )


def at_preference_positions(
    tokens: EncodedText, effects: TokenEffects, threshold: float
) -> EncodedText | None:
    """``tokens`` pooled only at the positions that *predict* the item's preference-driven
    tokens (patch-CE above ``threshold``): where a vector added to the residual stream raises
    or lowers them. None when no token passes or the response tokens differ from those the
    effects were measured on."""
    if tokens.response_ids != effects.token_ids.tolist():
        return None
    chosen = (effects.effects > threshold).nonzero().flatten().tolist()
    if not chosen:
        return None
    start = tokens.response_start - 1
    return replace(tokens, pooled_positions=tuple(start + t for t in chosen))


def _contrast_at_effects(
    pipeline: SteerX,
    evidence: UserEvidence,
    site: str,
    name: str,
    encode_pair: PairEncoder,
) -> Float[Tensor, " d_model"] | None:
    """The backbone's contrast of ``encode_pair(index, item)`` (the same response under two
    prompts), each side read only at the positions predicting the item's preference-driven
    tokens (:func:`at_preference_positions`, ``swap_threshold``)."""
    _require_activation_backbone(pipeline, name)
    threshold = pipeline.config.swap_threshold
    chosen, rejected = [], []
    for effects in evidence.attribution.items:
        item = evidence.user.history[effects.item_index]
        pair = encode_pair(effects.item_index, item)
        if pair is None:
            continue
        sides = [at_preference_positions(side, effects, threshold) for side in pair]
        if any(side is None for side in sides):
            continue
        chosen.append(Sample(item, sides[0], exact_tokens=True))
        rejected.append(Sample(item, sides[1], exact_tokens=True))
    return pipeline.contrast(chosen, rejected, site) if chosen else None


def description_at_effects_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The user's texts with the description in the prompt vs without it, read only where
    the preference-driven tokens are predicted."""
    description = user_description(evidence)
    if description is None:
        return None
    system = DESCRIPTION_SYSTEM_TEMPLATE.format(description=description)
    encode_pair = _system_pairs(pipeline.adapter.tokenizer, system, None)
    return _contrast_at_effects(pipeline, evidence, site, "description_at_effects", encode_pair)


def history_at_effects_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The user's texts after their own other fit items vs after a counterfactual user's,
    read only where the preference-driven tokens are predicted: the in-context effect of the
    user's history restricted to the tokens it causes."""
    if len(evidence.user.history) < 2:
        return None
    encode_pair = _history_pairs(pipeline, evidence, population)
    return _contrast_at_effects(pipeline, evidence, site, "history_at_effects", encode_pair)


def _other_descriptions(
    pipeline: SteerX, evidence: UserEvidence, population: Population, name: str
) -> list[str]:
    """The descriptions of the counterfactual users drawn for attribution that differ from
    the user's own (``population.descriptions``; a one-line error when it is empty)."""
    if not population.descriptions:
        raise SteerXError(
            f"construction {name!r} contrasts the user's description with other users' "
            "descriptions: fit with SteerX.fit_many(users) (or set Population.descriptions)"
        )
    user, config = evidence.user, pipeline.config
    others = counterfactual_users(user, population.users, config.k_counterfactual, config.seed)
    own = user_description(evidence)
    return [
        text
        for other in others
        if (text := population.descriptions.get(other.user_id)) and text != own
    ]


def description_specific_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The user's texts with *their* description in the prompt vs with other users'
    descriptions (those of the counterfactual users drawn for attribution), read only where
    the preference-driven tokens are predicted: what this description does that other
    descriptions do not (the shift any description causes cancels)."""
    description = user_description(evidence)
    if description is None:
        return None
    theirs = _other_descriptions(pipeline, evidence, population, "description_specific")
    if not theirs:
        return None
    tokenizer = pipeline.adapter.tokenizer
    own = DESCRIPTION_SYSTEM_TEMPLATE.format(description=description)
    parts = [
        _contrast_at_effects(
            pipeline,
            evidence,
            site,
            "description_specific",
            _system_pairs(tokenizer, own, DESCRIPTION_SYSTEM_TEMPLATE.format(description=text)),
        )
        for text in theirs
    ]
    present = [part for part in parts if part is not None]
    return None if not present else torch.stack(present).mean(0)


def description_contrast_specific_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The unit ``description_contrast`` direction plus half the unit
    ``description_specific`` direction (the ratio chosen on validation items): the
    description's general effect with what is specific to this user's description."""
    contrast = description_contrast_component(pipeline, evidence, population, site)
    specific = description_specific_component(pipeline, evidence, population, site)
    if contrast is None or float(contrast.norm()) == 0:
        return None
    direction = contrast / contrast.norm()
    if specific is not None and float(specific.norm()) > 0:
        direction = direction + SPECIFIC_SHARE * specific / specific.norm()
    return direction


def description_blend_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The mean of the unit ``description_contrast`` direction (the description's effect on
    the whole response) and the unit ``description_at_effects`` direction (its effect where
    the preference-driven tokens are predicted); either alone if the other is missing."""
    return mean_of_units(
        description_contrast_component(pipeline, evidence, population, site),
        description_at_effects_component(pipeline, evidence, population, site),
    )


def described_answers(
    pipeline: SteerX, items: list[HistoryItem], description: str
) -> list[HistoryItem]:
    """The model's greedy answers to ``items``' prompts with ``description`` as the system
    text (memoised per prompt by :meth:`SteerX.answers`, disk-cached with ŷ)."""
    system = DESCRIPTION_SYSTEM_TEMPLATE.format(description=description)
    prompts = [build_prompt(pipeline.adapter.tokenizer, i.input, system=system) for i in items]
    answers = pipeline.answers(prompts)
    return [HistoryItem(item.input, answer) for item, answer in zip(items, answers, strict=True)]


def description_pairs_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """Answers written with the description (chosen) vs plain answers ŷ (rejected)."""
    description = user_description(evidence)
    if description is None:
        return None
    items = list(evidence.user.history)
    chosen = described_answers(pipeline, items, description)
    return pipeline.contrast(chosen, list(evidence.negatives), site)


def _distilled(
    pipeline: SteerX,
    evidence: UserEvidence,
    site: str,
    teachers: Callable[[int, HistoryItem, EncodedText], Teachers],
) -> Float[Tensor, " d_model"] | None:
    """The first-order distillation direction (:func:`steerx_lens.distill.distillation_direction`)
    at ``site`` of the user's texts, read without any system text or history, toward
    ``teachers(index, item, text)`` (``text``: the item as read; None: its own tokens; an empty
    list skips the item)."""
    tokenizer = pipeline.adapter.tokenizer
    students = [encode_item(tokenizer, item, ()) for item in evidence.user.history]
    targets = [
        teachers(index, item, text)
        for index, (item, text) in enumerate(zip(evidence.user.history, students, strict=True))
    ]
    return distillation_direction(pipeline.adapter, site, students, targets)


def _described(tokenizer: object, item: HistoryItem, description: str) -> EncodedText:
    return encode_item(
        tokenizer, item, (), DESCRIPTION_SYSTEM_TEMPLATE.format(description=description)
    )


def description_distill_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The direction that moves the model's predictions on the user's texts toward its
    predictions with the description in the prompt (first-order context distillation)."""
    description = user_description(evidence)
    if description is None:
        return None
    tokenizer = pipeline.adapter.tokenizer
    return _distilled(
        pipeline,
        evidence,
        site,
        lambda _, item, __: [(1.0, _described(tokenizer, item, description))],
    )


def description_distill_specific_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """As ``description_distill``, toward what the user's description makes the model predict
    *minus* what the counterfactual users' descriptions make it predict: the shift any
    description causes cancels, what this description says does not."""
    description = user_description(evidence)
    if description is None:
        return None
    theirs = _other_descriptions(pipeline, evidence, population, "description_distill_specific")
    if not theirs:
        return None
    tokenizer = pipeline.adapter.tokenizer

    def teachers(_: int, item: HistoryItem, __: EncodedText) -> Teachers:
        own = [(1.0, _described(tokenizer, item, description))]
        return own + [(-1.0 / len(theirs), _described(tokenizer, item, t)) for t in theirs]

    return _distilled(pipeline, evidence, site, teachers)


def history_distill_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The direction that moves the model's predictions on each of the user's texts toward its
    predictions after the user's own other fit items (an in-context vector in output space)."""
    user, tokenizer = evidence.user, pipeline.adapter.tokenizer
    if len(user.history) < 2:
        return None

    def teachers(index: int, item: HistoryItem, _: EncodedText) -> Teachers:
        rest = recent_items(
            tokenizer, user.history[:index] + user.history[index + 1 :], CONTEXT_BUDGET
        )
        return [(1.0, encode_item(tokenizer, item, rest))] if rest else []

    return _distilled(pipeline, evidence, site, teachers)


def preference_gradient_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The direction that most raises the likelihood of the user's *preference-driven* tokens
    (patch-CE above ``swap_threshold``) in their own texts: the causal effects choose which
    tokens the vector is fitted to."""
    threshold = pipeline.config.swap_threshold
    by_item = {effects.item_index: effects for effects in evidence.attribution.items}

    def teachers(index: int, _: HistoryItem, text: EncodedText) -> Teachers:
        effects = by_item.get(index)
        if effects is None or effects.token_ids.tolist() != text.response_ids:
            return []  # no effects measured on these tokens: skip the item
        return (effects.effects > threshold).float()

    return _distilled(pipeline, evidence, site, teachers)


def preference_description_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The mean of the unit ``preference_gradient`` direction (what the causal effects select)
    and the unit ``description_distill`` direction (what the description makes the model
    predict); either alone if the other is missing."""
    return mean_of_units(
        preference_gradient_component(pipeline, evidence, population, site),
        description_distill_component(pipeline, evidence, population, site),
    )


def likelihood_description_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The mean of the unit ``likelihood_gradient`` direction (what the user's texts need)
    and the unit ``description_distill`` direction (what the description makes the model
    predict): "½ history + ½ description" in output space; either alone if the other is
    missing."""
    return mean_of_units(
        likelihood_gradient_component(pipeline, evidence, population, site),
        description_distill_component(pipeline, evidence, population, site),
    )


def likelihood_gradient_component(
    pipeline: SteerX, evidence: UserEvidence, population: Population, site: str
) -> Float[Tensor, " d_model"] | None:
    """The direction that most raises the likelihood of the user's own texts (first order):
    the distillation control with the texts themselves as the teacher."""
    return _distilled(pipeline, evidence, site, lambda *_: None)


CONSTRUCTIONS: dict[str, Construction] = {
    "minimal_pairs": minimal_pairs_component,
    "description_contrast": description_contrast_component,
    "description_content": description_content_component,
    "history_contrast": history_contrast_component,
    "history_description": history_description_component,
    "description_pairs": description_pairs_component,
    "description_at_effects": description_at_effects_component,
    "history_at_effects": history_at_effects_component,
    "description_blend": description_blend_component,
    "description_specific": description_specific_component,
    "description_contrast_specific": description_contrast_specific_component,
    "description_distill": description_distill_component,
    "description_distill_specific": description_distill_specific_component,
    "history_distill": history_distill_component,
    "likelihood_gradient": likelihood_gradient_component,
    "preference_gradient": preference_gradient_component,
    "preference_description": preference_description_component,
    "likelihood_description": likelihood_description_component,
}
"""Personal-direction constructions by name (extend with :func:`register_construction`)."""


def register_construction(name: str, construction: Construction) -> None:
    """Make ``construction`` selectable as ``SteerXConfig(construction=name)``."""
    CONSTRUCTIONS[name] = construction


def check_construction(name: str, backbone: str, can_backpropagate: bool = True) -> None:
    """Fail fast: ``name`` must be registered, unless it is in :data:`ANY_BACKBONE` be built
    with an activation backbone, and if it is in :data:`NEEDS_GRADIENTS` run on a model that
    gradients flow back through."""
    get_construction(name)
    if name in NEEDS_GRADIENTS and not can_backpropagate:
        raise SteerXError(
            f"construction {name!r} needs the model's gradients, which a remote run cannot "
            "give; use an activation construction (e.g. 'description_contrast') or a local model"
        )
    if name not in ANY_BACKBONE and backbone not in ACTIVATION_BACKBONES:
        raise SteerXError(
            f"construction {name!r} compares one response under two prompts and needs an "
            f"activation backbone ({', '.join(ACTIVATION_BACKBONES)}); backbone {backbone!r} "
            f"supports {', '.join(ANY_BACKBONE)}"
        )


def get_construction(name: str) -> Construction:
    """The construction registered as ``name`` (a one-line error listing the known ones)."""
    try:
        return CONSTRUCTIONS[name]
    except KeyError:
        raise SteerXError(
            f"unknown construction {name!r}; known: {', '.join(CONSTRUCTIONS)}"
        ) from None

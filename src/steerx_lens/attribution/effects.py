"""SteerX stage 1: causal token effects of a user's preference context (and per layer).

For each history item, the clean run (the user's own leave-one-out history block) is compared
with counterfactual runs (:class:`~steerx_lens.attribution.config.AttributionConfig` says
which); the effect of each response token is the difference of their log-probabilities (or
probabilities).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerx_lens.attribution.config import DEFAULT_CONFIG, AttributionConfig
from steerx_lens.attribution.scoring import Scorer, Scores, chunks
from steerx_lens.attribution.sequences import (
    ItemSequence,
    counterfactual_contexts,
    no_history_sequence,
    prepare_items,
    token_texts,
)
from steerx_lens.backends import ModelAdapter, get_adapter
from steerx_lens.data import HistoryItem, UserHistory
from steerx_lens.text import EncodedText, pad_batch

EXACT_SITES: frozenset[str] = frozenset({"hook_embed", "blocks.0.hook_resid_pre"})
"""Sites where the patched run *is* the counterfactual run (tested), so it is not re-run."""


@dataclass
class TokenEffects:
    """Per-token causal effects on one history item's response tokens.

    ``logp_counterfactual`` is averaged over the counterfactual contexts. ``effects`` are
    ``logp_user - logp_counterfactual`` (``measure="logprob"``) or ``p_user - mean_k p_k``
    (``measure="prob"``). ``tokens`` are display texts that concatenate to the response.
    ``counterfactual_top`` is the model's top-1 prediction at each position under the first
    counterfactual context (used to build SteerX's minimal pairs).
    """

    user_id: str
    item_index: int
    tokens: list[str]
    token_ids: Int[Tensor, " n_tokens"]
    effects: Float[Tensor, " n_tokens"]
    logp_user: Float[Tensor, " n_tokens"]
    logp_counterfactual: Float[Tensor, " n_tokens"]
    measure: str = "logprob"
    counterfactual_top: Int[Tensor, " n_tokens"] | None = None


@dataclass
class LayerEffects:
    """Layer-resolved effects of one item: row ``j`` patches only ``layers[j]``'s input."""

    user_id: str
    item_index: int
    layers: list[int]
    tokens: list[str]
    token_ids: Int[Tensor, " n_tokens"]
    effects: Float[Tensor, "layers n_tokens"]


@dataclass
class _Plan:
    """Everything computed before the forward passes for one user."""

    sequences: list[ItemSequence]
    # counterfactual rows and the item each belongs to (K per item, or 1 for prompt/neutral)
    counterfactual: list[EncodedText] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)


def counterfactual_users(
    user: UserHistory, population: Sequence[UserHistory], k: int, seed: int
) -> list[UserHistory]:
    """``k`` other users, drawn per user: seeded by ``seed`` and the user's id from the other
    users sorted by id, so two users get independent draws and the draw does not depend on the
    population's order (fewer if the population is smaller)."""
    others = sorted(
        (other for other in population if other.user_id != user.user_id and other.history),
        key=lambda other: other.user_id,
    )
    if not others:
        raise ValueError(
            f"no other users to take counterfactual contexts from for user {user.user_id!r}: "
            "pass population=[...] with other users' histories, or use "
            "counterfactual='neutral' (or method='prompt')"
        )
    return random.Random(f"{seed}:{user.user_id}").sample(others, min(k, len(others)))


def _warn_budget(user: UserHistory, sequences: Sequence[ItemSequence], budget: int) -> None:
    """One warning per kind per call: dropped history items, truncated responses."""
    dropped = [s.item_index for s in sequences if s.n_dropped]
    truncated = [s.item_index for s in sequences if s.truncated]
    if dropped:
        warnings.warn(
            f"user {user.user_id!r}: dropped the oldest other history items for item(s) "
            f"{dropped} to fit max_context_tokens={budget}",
            stacklevel=4,
        )
    if truncated:
        warnings.warn(
            f"user {user.user_id!r}: item(s) {truncated} do not fit max_context_tokens={budget} "
            "even without history; their responses were truncated",
            stacklevel=4,
        )


def _plan(
    tokenizer: Any,
    user: UserHistory,
    population: Sequence[UserHistory],
    config: AttributionConfig,
    targets: Sequence[HistoryItem] | None = None,
) -> _Plan:
    sequences = prepare_items(tokenizer, user, config.max_context_tokens, targets)
    _warn_budget(user, sequences, config.max_context_tokens)
    plan = _Plan(sequences)
    if config.method == "prompt":
        for index, seq in enumerate(sequences):
            item = (user.history if targets is None else targets)[index]
            plan.counterfactual.append(no_history_sequence(tokenizer, item, seq))
            plan.owner.append(index)
        return plan
    sources = (
        []
        if config.counterfactual == "neutral"
        else counterfactual_users(user, population, config.k_counterfactual, config.seed)
    )
    for index, seq in enumerate(sequences):
        for context in counterfactual_contexts(
            tokenizer, seq.context_len, config.counterfactual, sources
        ):
            plan.counterfactual.append(seq.with_context(context))
            plan.owner.append(index)
    return plan


def _counterfactual_logprobs(
    scorer: Scorer, plan: _Plan, counterfactual: str, site_groups: Sequence[Sequence[str]]
) -> list[list[Scores]]:
    """log p of the response under do(h_0), ``[site group][counterfactual row]``.

    With ``"mean"`` the rows are the per-item clean rows (one per item).
    """
    sites = sorted({site for group in site_groups for site in group})
    cf_rows = plan.counterfactual
    clean = plan.sequences
    if counterfactual == "mean":
        d_model = scorer.adapter.d_model
        sums = {site: torch.zeros(len(clean), d_model) for site in sites}
        counts = torch.zeros(len(clean))
        for chunk in chunks(cf_rows, scorer.batch_size):
            acts = scorer.activations([cf_rows[i] for i in chunk], sites)
            context = pad_batch([cf_rows[i] for i in chunk], scorer.adapter.pad_token_id).context
            for b, i in enumerate(chunk):
                owner = plan.owner[i]
                counts[owner] += context[b].sum()
                for site in sites:
                    sums[site][owner] += acts[site][b][context[b]].float().sum(dim=0).cpu()
        means = {site: sums[site] / counts.clamp(min=1)[:, None] for site in sites}

        def mean_source(chunk: list[int], inputs: dict[str, Tensor]) -> dict[str, Tensor]:
            shape = (len(chunk), inputs["input_ids"].shape[1], d_model)
            return {site: means[site][chunk][:, None, :].expand(shape) for site in sites}

        return scorer.patched(clean, site_groups, mean_source)
    if all(set(group) <= EXACT_SITES for group in site_groups):
        return [scorer.plain(cf_rows)] * len(site_groups)
    paired = [clean[owner] for owner in plan.owner]

    def counterfactual_source(chunk: list[int], inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        # Same lengths as the paired clean rows -> padded exactly like ``inputs``.
        return scorer.activations([cf_rows[i] for i in chunk], sites)

    return scorer.patched(paired, site_groups, counterfactual_source)


def _effects(
    user: Scores, counterfactuals: Sequence[Scores], measure: str
) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """(effects, mean counterfactual log-prob) from the user's and the K counterfactual runs."""
    user_logp = user.logp
    stacked = torch.stack([scores.logp for scores in counterfactuals])
    if measure == "prob":
        effects = user_logp.exp() - stacked.exp().mean(dim=0)
    else:
        effects = user_logp - stacked.mean(dim=0)
    return effects, stacked.mean(dim=0)


def _setup(model: Any, tokenizer: Any, config: AttributionConfig) -> tuple[ModelAdapter, Scorer]:
    adapter = get_adapter(model, tokenizer=tokenizer)
    return adapter, Scorer(model, adapter, config.batch_size)


def token_effects(
    model: Any,
    user: UserHistory,
    population: Sequence[UserHistory] = (),
    config: AttributionConfig = DEFAULT_CONFIG,
    *,
    tokenizer: Any = None,
    targets: Sequence[HistoryItem] | None = None,
) -> list[TokenEffects]:
    """Causal effects of the user's leave-one-out context on each history item's tokens.

    With ``targets`` (e.g. the user's held-out items) the targets are scored instead, each with
    the user's whole history as context (``item_index`` then indexes ``targets``).

    ``config.method="patch"``: the clean run (own history block) vs the same sequence whose
    context positions are patched at ``config.sites`` with the activations of a counterfactual
    block of the same length: ``k_counterfactual`` other users' blocks from ``population``
    (seeded choice, effects averaged), a ``"neutral"`` block, or the ``"mean"`` activation over
    other users' context positions. ``method="prompt"`` (NextQuill): the counterfactual deletes
    the history block (``counterfactual``, ``sites`` and ``population`` are not used). The
    ``k_counterfactual`` other users are drawn once per call, seeded by ``seed`` and the user's
    id (two users get independent draws), so every item of the user sees the same ones. ``max_context_tokens`` must fit the model's context
    window.
    """
    adapter, scorer = _setup(model, tokenizer, config)
    groups = [config.patch_sites]
    for site in groups[0]:
        adapter.resolve(site)
    plan = _plan(adapter.tokenizer, user, population, config, targets)
    user_logps = scorer.plain(plan.sequences)
    if config.method == "prompt":
        cf_logps = scorer.plain(plan.counterfactual)
        owners = plan.owner
    else:
        cf_logps = _counterfactual_logprobs(scorer, plan, config.counterfactual, groups)[0]
        owners = list(range(len(plan.sequences))) if config.counterfactual == "mean" else plan.owner
    results = []
    for index, seq in enumerate(plan.sequences):
        mine = [cf_logps[i] for i, owner in enumerate(owners) if owner == index]
        effects, logp_cf = _effects(user_logps[index], mine, config.measure)
        ids = seq.response_ids
        results.append(
            TokenEffects(
                user.user_id,
                index,
                token_texts(adapter.tokenizer, ids),
                torch.tensor(ids),
                effects,
                user_logps[index].logp,
                logp_cf,
                config.measure,
                counterfactual_top=mine[0].top,
            )
        )
    return results


def layer_effects(
    model: Any,
    user: UserHistory,
    population: Sequence[UserHistory] = (),
    config: AttributionConfig = DEFAULT_CONFIG,
    *,
    layers: Sequence[int] | None = None,
    tokenizer: Any = None,
) -> list[LayerEffects]:
    """Layer-resolved patch effects: one row per layer ``l`` patching ``blocks.{l}.hook_resid_pre``.

    Patching layer ``l``'s input at the context positions makes the context counterfactual from
    layer ``l`` on while the response still reads the user's context in layers ``< l``; layer 0
    is the full effect of :func:`token_effects`. The counterfactual runs are cached once. This
    always patches: ``config.method`` and ``config.sites`` are not used.
    """
    config = replace(config, method="patch", sites=None)
    adapter, scorer = _setup(model, tokenizer, config)
    chosen = list(range(adapter.n_layers)) if layers is None else list(layers)
    groups = [[f"blocks.{layer}.hook_resid_pre"] for layer in chosen]
    for group in groups:
        adapter.resolve(group[0])
    plan = _plan(adapter.tokenizer, user, population, config)
    user_logps = scorer.plain(plan.sequences)
    per_group = _counterfactual_logprobs(scorer, plan, config.counterfactual, groups)
    owners = list(range(len(plan.sequences))) if config.counterfactual == "mean" else plan.owner
    results = []
    for index, seq in enumerate(plan.sequences):
        rows = []
        for cf_logps in per_group:
            mine = [cf_logps[i] for i, owner in enumerate(owners) if owner == index]
            rows.append(_effects(user_logps[index], mine, config.measure)[0])
        ids = seq.response_ids
        results.append(
            LayerEffects(
                user.user_id,
                index,
                chosen,
                token_texts(adapter.tokenizer, ids),
                torch.tensor(ids),
                torch.stack(rows),
            )
        )
    return results

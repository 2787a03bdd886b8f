"""SteerX stages 1-2: causal token effects of a user's preference context, selection, spans.

For a user u with history items (x_i, y_i) and each token t of y_i::

    CE_{i,t} = log p(y_t | x_i, do(h_u), y_<t) - log p(y_t | x_i, do(h_0), y_<t)

(or ``p1 - p2`` with ``measure="prob"``). ``h_u`` is the user's *other* history items
(leave-one-out), put in the prompt as a history block with :func:`steerx_lens.data.build_prompt`.

What is a reconstruction: the SteerX paper's body was not available, so the estimator's form
(a log-probability or probability difference with and without the user's context, per response
token, thresholded) follows NextQuill (arXiv 2506.02368), whose ``do(h_0)`` deletes the history
from the prompt (``method="prompt"`` here). The default ``do(h_0)`` of this library -- patching
*other users'* same-length history blocks into the context positions (``method="patch"``,
``counterfactual="other_users"``) -- and the selection/span rules are this library's choices,
made from the measurements in DESIGN.md §1 (other users' contexts cancel what all users share:
sign-off tokens ≈ +12 nats, other tokens ≈ 0 ± 0.3; deleting the history also credits generic
format tokens).

Token layout: each item is one sequence ``[prompt head | history block | prompt rest |
response]``; the prompt is tokenized in those three pieces so that the block occupies whole
tokens whose positions (the *context positions*) can be swapped or patched while every other
position stays aligned. Everything runs on token ids + attention masks through
:mod:`steerx_lens.hooks`, so any backend of :func:`steerx_lens.backends.get_adapter` works.
Batches are left-padded.

Entry points: :func:`attribute_user` (effects + ranked spans), :func:`token_effects` (effects
only), :func:`layer_effects` (layer-resolved patching), and the pure helpers
:func:`select_tokens`, :func:`merge_spans`, :func:`aggregate_spans`.
"""

from __future__ import annotations

import random
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steerx_lens import hooks
from steerx_lens.backends import get_adapter
from steerx_lens.backends.base import ModelAdapter
from steerx_lens.data import (
    HISTORY_ITEM_TEMPLATE,
    HistoryItem,
    UserHistory,
    format_user_message,
    prompt_and_response,
)

Method = Literal["patch", "prompt"]
Counterfactual = Literal["other_users", "neutral", "mean"]
Measure = Literal["logprob", "prob"]
Rule = Literal["threshold", "topk", "zscore"]

METHODS: tuple[str, ...] = ("patch", "prompt")
COUNTERFACTUALS: tuple[str, ...] = ("other_users", "neutral", "mean")
MEASURES: tuple[str, ...] = ("logprob", "prob")
RULES: tuple[str, ...] = ("threshold", "topk", "zscore")

DEFAULT_K_COUNTERFACTUAL = 2
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_CONTEXT_TOKENS = 512
DEFAULT_SITES: tuple[str, ...] = ("blocks.0.hook_resid_pre",)
"""Patching the input of layer 0 at the context positions = running the counterfactual context
with every position kept (the full counterfactual). Later sites restrict the intervention to the
layers from there on (the response still sees the user's context below that layer)."""
EXACT_SITES: frozenset[str] = frozenset({"hook_embed", "blocks.0.hook_resid_pre"})
"""Sites where the patched run *is* the counterfactual run (tested), so it is not re-run."""
DEFAULT_THRESHOLDS: dict[str, float] = {"logprob": 1.0, "prob": 0.05}
"""Selection thresholds: 1 nat (DESIGN: sign-offs ≈ +12, others ≈ 0 ± 0.3); 0.05 (NextQuill)."""
DEFAULT_TOPK = 3
DEFAULT_Z = 2.0
FILLER_TEXTS: tuple[str, ...] = (" ", "\n")
"""Candidates for the neutral filler token that pads a short counterfactual block (the first
one that is a single token is used); it goes *before* the block, so the block's end stays next
to the prompt text that follows it."""
NEUTRAL_ITEM = "A previous text by this user."
"""``counterfactual="neutral"``: this item, in the history-block format, repeated to length."""
STOPWORDS: frozenset[str] = frozenset(
    """a an the and or but nor of to in on at for with by from as into onto about over under
    up down out off is are was were be been being am it its it's this that these those i you he
    she we they me him her us them my your his our their mine yours so if then than too very
    not no do does did done can could will would shall should may might must have has had
    just also more most some any all each every there here what which who whom whose how when
    where why s t""".split()
)
"""Spans made only of these words (or punctuation) are skipped when ranking (``stopwords=``)."""
_WORD_RE = re.compile(r"[#@]?\w+(?:['’]\w+)*|[^\w\s]+")
"""A word: letters/digits (an optional leading # or @, inner apostrophes), or a punctuation run."""
_SENTENCE_END = re.compile(r"^[^\w\s]*[.!?…][^\w\s]*$")
_KEY_STRIP = string.whitespace + ".,;:!?\"'()[]{}…-–—"
_REPLACEMENT = "\ufffd"


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Span:
    """A ranked preference span: ``score = (count / n_items) * mean span effect``."""

    text: str
    score: float
    count: int


@dataclass
class UserAttribution:
    """Stage 1-2 output for one user; ``description`` is filled by stage 3 (describe)."""

    user_id: str
    items: list[TokenEffects]
    spans: list[Span]
    description: str | None = None


@dataclass
class LayerEffects:
    """Layer-resolved effects of one item: row ``j`` patches only ``layers[j]``'s input."""

    user_id: str
    item_index: int
    layers: list[int]
    tokens: list[str]
    token_ids: Int[Tensor, " n_tokens"]
    effects: Float[Tensor, "layers n_tokens"]


@dataclass(frozen=True)
class Selection:
    """How preference-driven tokens are chosen and spans ranked (see :func:`select_tokens`).

    ``threshold=None`` takes :data:`DEFAULT_THRESHOLDS` for the measure in use.
    """

    rule: Rule = "threshold"
    threshold: float | None = None
    k: int = DEFAULT_TOPK
    z: float = DEFAULT_Z
    stopwords: frozenset[str] = STOPWORDS


@dataclass(frozen=True)
class ItemSequence:
    """One history item as token ids ``[head | history block | rest | response]``.

    ``context_start:context_stop`` are the block's positions (empty when no other item fits),
    the response starts at ``response_start``. ``n_dropped`` oldest other items were left out
    to fit the budget; ``truncated`` says the response was cut to fit.
    """

    user_id: str
    item_index: int
    input_ids: list[int]
    context_start: int
    context_stop: int
    response_start: int
    n_dropped: int = 0
    truncated: bool = False

    @property
    def context_len(self) -> int:
        """Number of history-block (context) positions."""
        return self.context_stop - self.context_start

    @property
    def response_ids(self) -> list[int]:
        """Token ids of the response (the user's own text)."""
        return self.input_ids[self.response_start :]

    def with_context(self, context_ids: Sequence[int]) -> list[int]:
        """The same sequence with the history block replaced by ``context_ids`` (same length)."""
        if len(context_ids) != self.context_len:
            raise ValueError(
                f"a counterfactual context must have {self.context_len} tokens, got "
                f"{len(context_ids)}"
            )
        ids = self.input_ids
        return ids[: self.context_start] + list(context_ids) + ids[self.context_stop :]


# --------------------------------------------------------------------------------------------
# Tokenization: items, history blocks, counterfactual contexts
# --------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def history_block(items: Sequence[HistoryItem]) -> str:
    """The history block text exactly as :func:`steerx_lens.data.build_prompt` writes it."""
    return "\n".join(
        HISTORY_ITEM_TEMPLATE.format(output=" ".join(item.output.split())) for item in items
    )


def encode_item(
    tokenizer: Any, item: HistoryItem, others: Sequence[HistoryItem]
) -> tuple[list[int], int, int, int]:
    """(ids, context_start, context_stop, response_start) for ``item`` with ``others`` as history.

    Response tokens are found by tokenizing the prompt's tail with and without the response;
    the first must be a prefix of the second.
    """
    prompt, full = prompt_and_response(tokenizer, item, history=list(others) or None)
    response_text = full[len(prompt) :]
    # Chat-template text already carries its special tokens; plain prompts get the tokenizer's.
    special = not _uses_chat_template(tokenizer)
    if others:
        block = history_block(others)
        start = prompt.find(format_user_message(item.input, others))
        start = prompt.find(block, max(start, 0))
        if start < 0:
            raise ValueError(
                "cannot locate the history block in the prompt built by data.build_prompt; the "
                "prompt templates and attribution.history_block disagree"
            )
        head = _encode(tokenizer, prompt[:start], special)
        block_ids = _encode(tokenizer, block)
        rest_text, rest_special = prompt[start + len(block) :], False
    else:
        head, block_ids, rest_text, rest_special = [], [], prompt, special
    rest = _encode(tokenizer, rest_text, rest_special)
    rest_full = _encode(tokenizer, rest_text + response_text, rest_special)
    if rest_full[: len(rest)] != rest:
        raise ValueError(
            f"the prompt's tokens are not a prefix of prompt + response's tokens (the tokenizer "
            f"merges across the boundary at {rest_text[-20:]!r} + {response_text[:20]!r}); "
            "response tokens cannot be located"
        )
    if len(rest_full) == len(rest):
        raise ValueError("the item's response is empty: there are no tokens to attribute")
    stop = len(head) + len(block_ids)
    return head + block_ids + rest_full, len(head), stop, stop + len(rest)


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
            return len(encode_item(tokenizer, item, others[n_dropped:])[0]) <= max_context_tokens

        low, high = 0, len(others)  # smallest n_dropped that fits (binary search), else all
        while low < high:
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle + 1
        ids, start, stop, response_start = encode_item(tokenizer, item, others[low:])
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
            ItemSequence(user.user_id, index, ids, start, stop, response_start, low, truncated)
        )
    return sequences


def filler_token(tokenizer: Any) -> int:
    """The neutral padding token of counterfactual blocks (first of :data:`FILLER_TEXTS`)."""
    for text in FILLER_TEXTS:
        ids = _encode(tokenizer, text)
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
        line = _encode(tokenizer, history_block([HistoryItem("", NEUTRAL_ITEM)]))
        newline = _encode(tokenizer, "\n")
        repeats = length // max(len(line), 1) + 1
        ids = (line + newline) * repeats
        return [_fit_length(ids[: len(ids) - len(newline)], length, filler)]
    return [
        _fit_length(_encode(tokenizer, history_block(other.history)), length, filler)
        for other in sources
    ]


def _no_history_sequence(tokenizer: Any, item: HistoryItem, seq: ItemSequence) -> list[int]:
    """``method="prompt"``: the same item without the history block, same response tokens."""
    ids, _, _, response_start = encode_item(tokenizer, item, [])
    response = ids[response_start:][: len(seq.response_ids)]
    if response != seq.response_ids:
        raise ValueError(
            f"user {seq.user_id!r} item {seq.item_index}: the response tokenizes differently "
            "with and without the history block, so method='prompt' cannot compare them"
        )
    return ids[:response_start] + response


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


# --------------------------------------------------------------------------------------------
# Batched forward passes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    """One sequence to score: ids, the positions patched, where the response starts."""

    ids: list[int]
    context: tuple[int, int]
    response_start: int


def _chunks(rows: Sequence[_Row], batch_size: int) -> Iterator[list[int]]:
    """Row indices in length-sorted chunks of ``batch_size`` (less padding)."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].ids), i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _padded(rows: Sequence[_Row], pad_id: int) -> dict[str, Int[Tensor, "batch pos"]]:
    """Left-padded ``{"input_ids", "attention_mask"}`` for ``rows``."""
    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row.ids) :] = torch.tensor(row.ids)
        mask[b, width - len(row.ids) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _context_mask(rows: Sequence[_Row]) -> Bool[Tensor, "batch pos"]:
    """The context positions of each left-padded row."""
    width = max(len(row.ids) for row in rows)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        offset = width - len(row.ids)
        mask[b, offset + row.context[0] : offset + row.context[1]] = True
    return mask


class Scores(NamedTuple):
    """A row's response scores: log p of each actual token and the model's top-1 prediction."""

    logp: Float[Tensor, " n_response"]
    top: Int[Tensor, " n_response"]


def _response_scores(scores: hooks.TokenScores, rows: Sequence[_Row]) -> list[Scores]:
    """Scores of each row's response tokens (position ``p`` is predicted at ``p - 1``)."""
    width = scores.logp.shape[1] + 1
    out = []
    for b, row in enumerate(rows):
        offset = width - len(row.ids)
        start, stop = offset + row.response_start - 1, offset + len(row.ids) - 1
        out.append(Scores(scores.logp[b, start:stop].cpu(), scores.top[b, start:stop].cpu()))
    return out


_NO_SCORES = Scores(torch.empty(0), torch.empty(0, dtype=torch.long))
SourceFn = Callable[[list[int], dict[str, Tensor]], dict[str, Tensor]]


class _Scorer:
    """Runs rows through ``hooks`` in padded batches and returns response log-probs."""

    def __init__(self, model: Any, adapter: ModelAdapter, batch_size: int) -> None:
        self.model = model
        self.adapter = adapter
        self.batch_size = batch_size

    def plain(self, rows: Sequence[_Row]) -> list[Scores]:
        """Unpatched runs."""
        out: list[Scores] = [_NO_SCORES] * len(rows)
        for chunk in _chunks(rows, self.batch_size):
            batch_rows = [rows[i] for i in chunk]
            inputs = _padded(batch_rows, self.adapter.pad_token_id)
            scores = hooks.score_tokens(self.model, inputs, tokenizer=self.adapter.tokenizer)
            for i, logp in zip(chunk, _response_scores(scores, batch_rows), strict=True):
                out[i] = logp
        return out

    def patched(
        self, rows: Sequence[_Row], site_groups: Sequence[Sequence[str]], sources: SourceFn
    ) -> list[list[Scores]]:
        """Runs with each site group patched at the context positions; ``[group][row]``.

        ``sources(chunk, inputs)`` gives the ``[batch, pos, d]`` patch source of every site for
        the rows ``chunk`` (left-padded like ``inputs``).
        """
        out = [[_NO_SCORES] * len(rows) for _ in site_groups]
        for chunk in _chunks(rows, self.batch_size):
            batch_rows = [rows[i] for i in chunk]
            inputs = _padded(batch_rows, self.adapter.pad_token_id)
            positions = _context_mask(batch_rows)
            source = sources(chunk, inputs)
            for g, group in enumerate(site_groups):
                patches = [hooks.Patch(site, source[site], positions=positions) for site in group]
                scores = hooks.score_tokens(
                    self.model, inputs, *patches, tokenizer=self.adapter.tokenizer
                )
                for i, logp in zip(chunk, _response_scores(scores, batch_rows), strict=True):
                    out[g][i] = logp
        return out

    def activations(self, rows: Sequence[_Row], sites: Sequence[str]) -> dict[str, Tensor]:
        """Activations ``[batch, pos, d]`` at ``sites`` of ``rows`` run as one left-padded batch."""
        inputs = _padded(rows, self.adapter.pad_token_id)
        return hooks.activations(self.model, inputs, list(sites), tokenizer=self.adapter.tokenizer)


# --------------------------------------------------------------------------------------------
# Effects
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything computed before the forward passes for one user."""

    sequences: list[ItemSequence]
    clean: list[_Row]
    # counterfactual rows and the item each belongs to (K per item, or 1 for prompt/neutral)
    counterfactual: list[_Row] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)


def _check_options(
    method: str, counterfactual: str, measure: str, k: int, batch_size: int, budget: int
) -> None:
    for value, allowed, name in (
        (method, METHODS, "method"),
        (counterfactual, COUNTERFACTUALS, "counterfactual"),
        (measure, MEASURES, "measure"),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")
    for value, name in ((k, "k_counterfactual"), (batch_size, "batch_size")):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if budget < 2:
        raise ValueError(f"max_context_tokens must be at least 2, got {budget}")


def _counterfactual_users(
    user: UserHistory, population: Sequence[UserHistory], k: int, seed: int
) -> list[UserHistory]:
    """``k`` other users (seeded sample; fewer if the population is smaller)."""
    others = [other for other in population if other.user_id != user.user_id and other.history]
    if not others:
        raise ValueError(
            f"no other users to take counterfactual contexts from for user {user.user_id!r}: "
            "pass population=[...] with other users' histories, or use "
            "counterfactual='neutral' (or method='prompt')"
        )
    return random.Random(seed).sample(others, min(k, len(others)))


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
    method: str,
    counterfactual: str,
    k: int,
    budget: int,
    seed: int,
    targets: Sequence[HistoryItem] | None = None,
) -> _Plan:
    sequences = prepare_items(tokenizer, user, budget, targets)
    _warn_budget(user, sequences, budget)
    clean = [
        _Row(s.input_ids, (s.context_start, s.context_stop), s.response_start) for s in sequences
    ]
    plan = _Plan(sequences, clean)
    if method == "prompt":
        for index, seq in enumerate(sequences):
            item = (user.history if targets is None else targets)[index]
            ids = _no_history_sequence(tokenizer, item, seq)
            plan.counterfactual.append(_Row(ids, (0, 0), len(ids) - len(seq.response_ids)))
            plan.owner.append(index)
        return plan
    sources = (
        [] if counterfactual == "neutral" else _counterfactual_users(user, population, k, seed)
    )
    for index, seq in enumerate(sequences):
        for context in counterfactual_contexts(tokenizer, seq.context_len, counterfactual, sources):
            row = _Row(
                seq.with_context(context), (seq.context_start, seq.context_stop), seq.response_start
            )
            plan.counterfactual.append(row)
            plan.owner.append(index)
    return plan


def _counterfactual_logprobs(
    scorer: _Scorer, plan: _Plan, counterfactual: str, site_groups: Sequence[Sequence[str]]
) -> list[list[Scores]]:
    """log p of the response under do(h_0), ``[site group][counterfactual row]``.

    With ``"mean"`` the rows are the per-item clean rows (one per item).
    """
    sites = sorted({site for group in site_groups for site in group})
    cf_rows = plan.counterfactual
    if counterfactual == "mean":
        d_model = scorer.adapter.d_model
        sums = {site: torch.zeros(len(plan.clean), d_model) for site in sites}
        counts = torch.zeros(len(plan.clean))
        for chunk in _chunks(cf_rows, scorer.batch_size):
            acts = scorer.activations([cf_rows[i] for i in chunk], sites)
            context = _context_mask([cf_rows[i] for i in chunk])
            for b, i in enumerate(chunk):
                owner = plan.owner[i]
                counts[owner] += context[b].sum()
                for site in sites:
                    sums[site][owner] += acts[site][b][context[b]].float().sum(dim=0).cpu()
        means = {site: sums[site] / counts.clamp(min=1)[:, None] for site in sites}

        def mean_source(chunk: list[int], inputs: dict[str, Tensor]) -> dict[str, Tensor]:
            shape = (len(chunk), inputs["input_ids"].shape[1], d_model)
            return {site: means[site][chunk][:, None, :].expand(shape) for site in sites}

        return scorer.patched(plan.clean, site_groups, mean_source)
    if all(set(group) <= EXACT_SITES for group in site_groups):
        return [scorer.plain(cf_rows)] * len(site_groups)
    paired = [plan.clean[owner] for owner in plan.owner]

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


def _setup(
    model: Any,
    tokenizer: Any,
    method: str,
    counterfactual: str,
    measure: str,
    k: int,
    batch_size: int,
    budget: int,
) -> tuple[ModelAdapter, _Scorer]:
    _check_options(method, counterfactual, measure, k, batch_size, budget)
    adapter = get_adapter(model, tokenizer=tokenizer)
    return adapter, _Scorer(model, adapter, batch_size)


def token_effects(
    model: Any,
    user: UserHistory,
    population: Sequence[UserHistory] = (),
    *,
    method: Method = "patch",
    counterfactual: Counterfactual = "other_users",
    k_counterfactual: int = DEFAULT_K_COUNTERFACTUAL,
    sites: Sequence[str] | None = None,
    measure: Measure = "logprob",
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
    seed: int = 0,
    tokenizer: Any = None,
    targets: Sequence[HistoryItem] | None = None,
) -> list[TokenEffects]:
    """Causal effects of the user's leave-one-out context on each history item's tokens.

    With ``targets`` (e.g. the user's held-out items) the targets are scored instead, each with
    the user's whole history as context (``item_index`` then indexes ``targets``).

    ``method="patch"``: the clean run (own history block) vs the same sequence whose context
    positions are patched at ``sites`` (default :data:`DEFAULT_SITES`) with the activations of a
    counterfactual block of the same length: ``k_counterfactual`` other users' blocks from
    ``population`` (seeded choice, effects averaged), a ``"neutral"`` block, or the ``"mean"``
    activation over other users' context positions. ``method="prompt"`` (NextQuill):
    the counterfactual deletes the history block (``counterfactual``, ``sites`` and
    ``population`` are not used). The ``k_counterfactual`` other users are drawn once per call
    (``random.Random(seed)``), so every item of the user sees the same ones. ``max_context_tokens``
    must fit the model's context window.
    """
    adapter, scorer = _setup(
        model,
        tokenizer,
        method,
        counterfactual,
        measure,
        k_counterfactual,
        batch_size,
        max_context_tokens,
    )
    groups = [list(sites or DEFAULT_SITES)]
    if method == "prompt" and sites is not None:
        raise ValueError("sites= only applies to method='patch'")
    for site in groups[0]:
        adapter.resolve(site)
    plan = _plan(
        adapter.tokenizer,
        user,
        population,
        method,
        counterfactual,
        k_counterfactual,
        max_context_tokens,
        seed,
        targets,
    )
    user_logps = scorer.plain(plan.clean)
    if method == "prompt":
        cf_logps = scorer.plain(plan.counterfactual)
        owners = plan.owner
    else:
        cf_logps = _counterfactual_logprobs(scorer, plan, counterfactual, groups)[0]
        owners = list(range(len(plan.clean))) if counterfactual == "mean" else plan.owner
    results = []
    for index, seq in enumerate(plan.sequences):
        mine = [cf_logps[i] for i, owner in enumerate(owners) if owner == index]
        effects, logp_cf = _effects(user_logps[index], mine, measure)
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
                measure,
                counterfactual_top=mine[0].top,
            )
        )
    return results


def layer_effects(
    model: Any,
    user: UserHistory,
    population: Sequence[UserHistory] = (),
    *,
    layers: Sequence[int] | None = None,
    counterfactual: Counterfactual = "other_users",
    k_counterfactual: int = DEFAULT_K_COUNTERFACTUAL,
    measure: Measure = "logprob",
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
    seed: int = 0,
    tokenizer: Any = None,
) -> list[LayerEffects]:
    """Layer-resolved patch effects: one row per layer ``l`` patching ``blocks.{l}.hook_resid_pre``.

    Patching layer ``l``'s input at the context positions makes the context counterfactual from
    layer ``l`` on while the response still reads the user's context in layers ``< l``; layer 0
    is the full effect of :func:`token_effects`. The counterfactual runs are cached once.
    """
    adapter, scorer = _setup(
        model,
        tokenizer,
        "patch",
        counterfactual,
        measure,
        k_counterfactual,
        batch_size,
        max_context_tokens,
    )
    chosen = list(range(adapter.n_layers)) if layers is None else list(layers)
    groups = [[f"blocks.{layer}.hook_resid_pre"] for layer in chosen]
    for group in groups:
        adapter.resolve(group[0])
    plan = _plan(
        adapter.tokenizer,
        user,
        population,
        "patch",
        counterfactual,
        k_counterfactual,
        max_context_tokens,
        seed,
    )
    user_logps = scorer.plain(plan.clean)
    per_group = _counterfactual_logprobs(scorer, plan, counterfactual, groups)
    owners = list(range(len(plan.clean))) if counterfactual == "mean" else plan.owner
    results = []
    for index, seq in enumerate(plan.sequences):
        rows = []
        for cf_logps in per_group:
            mine = [cf_logps[i] for i, owner in enumerate(owners) if owner == index]
            rows.append(_effects(user_logps[index], mine, measure)[0])
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


# --------------------------------------------------------------------------------------------
# Selection, spans, ranking (pure)
# --------------------------------------------------------------------------------------------


def select_tokens(
    effects: Float[Tensor, " n_tokens"],
    rule: Rule = "threshold",
    threshold: float = DEFAULT_THRESHOLDS["logprob"],
    k: int = DEFAULT_TOPK,
    z: float = DEFAULT_Z,
) -> Bool[Tensor, " n_tokens"]:
    """Preference-driven tokens of one item; only positive effects are ever selected.

    ``"threshold"``: effect > ``threshold``; ``"topk"``: the ``k`` largest; ``"zscore"``:
    ``(effect - mean) / std > z`` within the item.
    """
    positive = effects > 0
    if rule == "threshold":
        return positive & (effects > threshold)
    if rule == "topk":
        chosen = torch.zeros_like(positive)
        chosen[effects.topk(min(k, effects.numel())).indices] = True
        return chosen & positive
    if rule == "zscore":
        if effects.numel() < 2:
            return torch.zeros_like(positive)
        scores = (effects - effects.mean()) / effects.std().clamp(min=1e-8)
        return positive & (scores > z)
    raise ValueError(f"unknown selection rule {rule!r}; choose one of {RULES}")


def _token_ranges(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """Character range of each token in ``"".join(tokens)``; an empty token (continuation of a
    split character) is given the character before it."""
    ranges, position = [], 0
    for token in tokens:
        if token:
            ranges.append((position, position + len(token)))
        else:
            ranges.append((max(position - 1, 0), position))
        position += len(token)
    return ranges


def merge_spans(
    tokens: Sequence[str],
    effects: Float[Tensor, " n_tokens"],
    selected: Bool[Tensor, " n_tokens"],
) -> list[tuple[str, float]]:
    """Turn selected tokens into ``(span text, span effect)`` in text order.

    Each selected token marks every word it overlaps (a word is a run of letters/digits, with an
    optional leading ``#``/``@``, or a run of punctuation), so a selected sub-word token selects
    its whole word (``On|ward`` -> ``Onward``); consecutive selected words form one span, except
    across a sentence end (``.``/``!``/``?`` then whitespace) and around emoji/symbols. The span
    effect is the sum of the effects of the tokens overlapping it (for log-probs: the span's
    log-likelihood ratio).
    """
    text = "".join(tokens)
    words = [match.span() for match in _WORD_RE.finditer(text)]
    ranges = _token_ranges(tokens)
    overlaps = [
        [w for w, (ws, we) in enumerate(words) if ws < end and start < we] for start, end in ranges
    ]
    chosen = sorted({w for i, ws in enumerate(overlaps) if bool(selected[i]) for w in ws})
    groups: list[list[int]] = []
    for w in chosen:
        if groups and groups[-1][-1] == w - 1 and not _breaks_span(text, words[w - 1], words[w]):
            groups[-1].append(w)
        else:
            groups.append([w])
    spans = []
    for group in groups:
        members = set(group)
        effect = sum(float(effects[i]) for i, ws in enumerate(overlaps) if members & set(ws))
        spans.append((text[words[group[0]][0] : words[group[-1]][1]], effect))
    return spans


def _is_symbol(word: str) -> bool:
    """A word of symbols only (emoji, pictographs): neither letters/digits nor ASCII punctuation."""
    return all(not c.isalnum() and c not in string.punctuation for c in word)


def _breaks_span(text: str, before: tuple[int, int], after: tuple[int, int]) -> bool:
    """Adjacent selected words stay apart after a sentence end (``.``/``!``/``?``/``…`` then
    whitespace) and around a symbol word (an emoji is a unit of its own)."""
    first, second = text[before[0] : before[1]], text[after[0] : after[1]]
    sentence_end = bool(_SENTENCE_END.search(first)) and text[before[1] : before[1] + 1].isspace()
    return sentence_end or _is_symbol(first) or _is_symbol(second)


def span_key(text: str) -> str:
    """Matching key of a span: casefolded, surrounding whitespace and punctuation stripped."""
    return text.strip(_KEY_STRIP).casefold()


def _is_noise(key: str, stopwords: frozenset[str]) -> bool:
    """A span of stop-words and ASCII punctuation only."""
    words = _WORD_RE.findall(key)
    return all(w in stopwords or all(c in string.punctuation for c in w) for w in words)


def aggregate_spans(
    items: Sequence[TokenEffects], selection: Selection = Selection(), measure: Measure = "logprob"
) -> list[Span]:
    """Rank spans over a user's items: ``score = (count / n_items) * mean span effect``.

    Spans are matched by :func:`span_key`; the display text is the most frequent form. Spans of
    stop-words/punctuation only are skipped. Best first (ties by text).
    """
    threshold = DEFAULT_THRESHOLDS[measure] if selection.threshold is None else selection.threshold
    found: dict[str, list[tuple[str, float]]] = {}
    for item in items:
        selected = select_tokens(item.effects, selection.rule, threshold, selection.k, selection.z)
        for text, effect in merge_spans(item.tokens, item.effects, selected):
            key = span_key(text)
            if key and not _is_noise(key, selection.stopwords):
                found.setdefault(key, []).append((text.strip(), effect))
    spans = []
    for occurrences in found.values():
        display = Counter(text for text, _ in occurrences).most_common(1)[0][0]
        mean = sum(effect for _, effect in occurrences) / len(occurrences)
        frequency = len(occurrences) / max(len(items), 1)
        spans.append(Span(display, frequency * mean, len(occurrences)))
    return sorted(spans, key=lambda span: (-span.score, span.text))


def attribute_user(
    model: Any,
    user: UserHistory,
    population: Sequence[UserHistory] = (),
    *,
    method: Method = "patch",
    counterfactual: Counterfactual = "other_users",
    k_counterfactual: int = DEFAULT_K_COUNTERFACTUAL,
    sites: Sequence[str] | None = None,
    measure: Measure = "logprob",
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
    select: Selection = Selection(),
    seed: int = 0,
    tokenizer: Any = None,
) -> UserAttribution:
    """SteerX stages 1-2 for one user: :func:`token_effects`, then :func:`aggregate_spans`.

    ``population`` = other users providing counterfactual contexts (the user itself is skipped).
    """
    items = token_effects(
        model,
        user,
        population,
        method=method,
        counterfactual=counterfactual,
        k_counterfactual=k_counterfactual,
        sites=sites,
        measure=measure,
        batch_size=batch_size,
        max_context_tokens=max_context_tokens,
        seed=seed,
        tokenizer=tokenizer,
    )
    return UserAttribution(user.user_id, items, aggregate_spans(items, select, measure))

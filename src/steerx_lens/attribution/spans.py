"""SteerX stage 2: preference-driven tokens → spans → a user's ranked spans (pure functions).

A selected sub-word token selects its whole word; neighbouring selected words form one span;
spans are matched across a user's items and ranked by ``(count / n_items) * mean span effect``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from steerx_lens.attribution.config import (
    DEFAULT_CONFIG,
    DEFAULT_THRESHOLDS,
    DEFAULT_TOPK,
    DEFAULT_Z,
    RULES,
    AttributionConfig,
    Rule,
)
from steerx_lens.attribution.effects import TokenEffects

_WORD_RE = re.compile(r"[#@]?\w+(?:['’]\w+)*|[^\w\s]+")
"""A word: letters/digits (an optional leading # or @, inner apostrophes), or a punctuation run."""
_SENTENCE_END = re.compile(r"^[^\w\s]*[.!?…][^\w\s]*$")
_KEY_STRIP = string.whitespace + ".,;:!?\"'()[]{}…-–—"


@dataclass(frozen=True)
class Span:
    """A ranked preference span: ``score = (count / n_items) * mean span effect``."""

    text: str
    score: float
    count: int


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
    items: Sequence[TokenEffects], config: AttributionConfig = DEFAULT_CONFIG
) -> list[Span]:
    """Rank spans over a user's items: ``score = (count / n_items) * mean span effect``.

    Tokens are selected by ``config``'s rule (:func:`select_tokens`) and merged into spans
    (:func:`merge_spans`). Spans are matched by :func:`span_key`; the display text is the most
    frequent form. Spans of ``config.stopwords``/punctuation only are skipped. Best first (ties
    by text).
    """
    threshold = config.selection_threshold
    found: dict[str, list[tuple[str, float]]] = {}
    for item in items:
        selected = select_tokens(item.effects, config.rule, threshold, config.top_k, config.z)
        for text, effect in merge_spans(item.tokens, item.effects, selected):
            key = span_key(text)
            if key and not _is_noise(key, config.stopwords):
                found.setdefault(key, []).append((text.strip(), effect))
    spans = []
    for occurrences in found.values():
        display = Counter(text for text, _ in occurrences).most_common(1)[0][0]
        mean = sum(effect for _, effect in occurrences) / len(occurrences)
        frequency = len(occurrences) / max(len(items), 1)
        spans.append(Span(display, frequency * mean, len(occurrences)))
    return sorted(spans, key=lambda span: (-span.score, span.text))
